#!/usr/bin/env bash
# The run command: creates .venv on first use, installs requirements.txt, runs the training CLI.
# With no arguments it runs the default config into runs/default; otherwise the arguments go to
# `python -m dora_jax.train` (e.g. --config=configs/default.py --workdir=DIR --config.train.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
if [ "$#" -eq 0 ]; then
  set -- --config=configs/default.py --workdir=runs/default
fi
exec .venv/bin/python -m dora_jax.train "$@"
