#!/usr/bin/env bash
# The run command: creates .venv on first use, installs requirements.txt (when it changed), runs
# the training CLI. With no arguments it runs the default config into runs/default; otherwise the
# arguments go to `python -m dora_jax.train` (e.g. --config=configs/default.py --workdir=DIR
# --config.train.steps=50; overrides come after --config=).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv run -r requirements.txt
if [ "$#" -eq 0 ]; then
  set -- --config=configs/default.py --workdir=runs/default
fi
exec .venv/bin/python -m dora_jax.train "$@"
