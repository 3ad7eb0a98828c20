#!/usr/bin/env bash
# The test command: creates .venv on first use, installs the requirements, runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k inject`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
exec .venv/bin/python -m pytest -q "$@"
