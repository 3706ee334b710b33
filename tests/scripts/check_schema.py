#!/usr/bin/env python3
"""Checks playbooks against the JSON Schema the way an editor's YAML
language server does: `+FILE` must validate, `-FILE` must not.

    python3 check_schema.py SCHEMA.json +good.yaml -bad.yaml ...
"""
import json
import sys

import jsonschema
import yaml


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        validator = jsonschema.Draft202012Validator(json.load(f))
    wrong = []
    for arg in sys.argv[2:]:
        expect_valid, path = arg[0] == "+", arg[1:]
        with open(path, encoding="utf-8") as f:
            errors = list(validator.iter_errors(yaml.safe_load(f)))
        if expect_valid and errors:
            wrong.append(f"{path}: refused: {errors[0].message}")
        if not expect_valid and not errors:
            wrong.append(f"{path}: accepted, but it is a bad playbook")
    for line in wrong:
        print(line, file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
