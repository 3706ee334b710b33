#!/usr/bin/env bash
# `vllm bench serve` against the same engine `make bench` uses, pinned the
# same way (engine on core 0, client on core 1), for the README's
# comparison: its CPU per request and the TTFT it reads for a 20 ms prefill.
#
#   pip install vllm            # `vllm` on PATH; no GPU needed for the client
#   cargo build --release
#   benches/vllm-bench-serve.sh 500 10000    # rate/s, requests
#
# Runs offline: the prompts' tokenizer is a word-level one made here (the
# random dataset only needs one to count tokens). vllm's start-up costs some
# 10 s of CPU, so it is measured apart (a 10-request run) and taken off.
set -euo pipefail

rate=${1:-500}
requests=${2:-10000}
here=$(cd "$(dirname "$0")/.." && pwd)
shakedown=$here/target/release/shakedown
work=$(mktemp -d)
python=$(head -1 "$(command -v vllm)" | sed 's/^#!//')
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$python" - "$work/tokenizer" <<'EOF'
import sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i + 2 for i in range(2000)}}
words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
words.decoder = decoders.WordPiece()
PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]",
                        eos_token="[EOS]", model_max_length=4096).save_pretrained(sys.argv[1])
EOF

taskset -c 0 "$shakedown" engine --port "$port" --prefill-base 20ms --prefill-per-token 0s \
  --decode-per-token 2ms --batch-slowdown 0 --max-num-seqs 100000 >"$work/engine.log" 2>&1 &
engine=$!
trap 'kill $engine 2>/dev/null; wait $engine 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

# CPU seconds (user + system) of one run; its output kept in $work/$1.log.
run() {
  HF_HUB_OFFLINE=1 /usr/bin/time -f "cpu %U %S" -o "$work/$1.time" \
    taskset -c 1 vllm bench serve --backend openai-chat \
    --base-url "http://127.0.0.1:$port" --endpoint /v1/chat/completions \
    --model shakedown/emulated-llm --tokenizer "$work/tokenizer" \
    --dataset-name random --random-input-len 64 --random-output-len 16 --ignore-eos \
    --request-rate "$rate" --num-prompts "$2" --disable-tqdm >"$work/$1.log" 2>&1
  awk '/^cpu/ { print $2 + $3 }' "$work/$1.time"
}

startup=$(run startup 10)
total=$(run load "$requests")
grep -E 'Successful requests|Failed requests|Request throughput|Median TTFT|P99 TTFT' "$work/load.log"
awk -v t="$total" -v s="$startup" -v n="$requests" -v r="$rate" 'BEGIN {
  printf "vllm bench serve at %s/s: %.2f ms of CPU a request (%.1f s in all, %.1f s of it start-up)\n",
    r, (t - s) * 1000 / n, t, s }'
