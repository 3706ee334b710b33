#!/usr/bin/env python3
"""What a dashboard script reads from a `vllm bench serve --save-result`
file: the aggregate keys, nothing shakedown-specific. The tests run it on a
vLLM result and on shakedown's export and expect the same keys from both.

    python3 read_bench.py RESULT.json   # prints the keys as one JSON object
"""
import json
import sys

KEYS = [
    "duration",
    "completed",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "max_concurrency",
    "request_rate",
]
for metric in ("ttft", "tpot", "itl", "e2el"):
    for stat in ("mean", "median", "p99"):
        KEYS.append(f"{stat}_{metric}_ms")


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        result = json.load(f)
    missing = [k for k in KEYS if k not in result]
    if missing:
        print(f"missing keys: {missing}", file=sys.stderr)
        return 1
    wrong = [
        k
        for k in KEYS
        if result[k] is not None and not isinstance(result[k], (int, float))
    ]
    if wrong:
        print(f"not numbers: {wrong}", file=sys.stderr)
        return 1
    print(json.dumps({k: result[k] for k in KEYS}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
