#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install epiflow with everything
# the workflow and the tests need. Idempotent: once installed, it only re-installs when
# pyproject.toml changed (a stamp file in .venv records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "setup_env.sh: $PY is missing or older than Python 3.10 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
  "$PY" -m venv .venv
fi
STAMP=.venv/.epiflow-installed
WANT="$(.venv/bin/python -c 'import hashlib, sys; print(sys.version.split()[0], hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c "import epiflow, snakemake, pytest" 2>/dev/null; then
  exit 0
fi
echo "setup_env.sh: installing epiflow and its dependencies into .venv (first run: a few minutes)" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
# torch 2.13.0 is the CPU wheel available offline on this kind of machine; any newer spec pulls a CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[workflow,liftover,dev]"
echo "$WANT" > "$STAMP"
