# Sourced by run.sh and test.sh: `ensure_venv NAME PIP_ARGS...` creates .venv on first use and runs
# `pip install PIP_ARGS` only when those arguments or the requirement files changed since the last
# install under NAME (a stamp of their hash in .venv), so a repeated command starts at once.
ensure_venv() {
  local name="$1"
  shift
  [ -x .venv/bin/python ] || python3 -m venv .venv
  local stamp=".venv/.installed-$name"
  local hash
  hash=$(printf '%s\n' "$*" | cat - requirements*.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$hash" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" || return 1
    echo "$hash" >"$stamp"
  fi
}
