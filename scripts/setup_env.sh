#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install epiflow with everything
# the workflow and the tests need. Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch 2.13.0 is the CPU wheel available offline on this kind of machine; any newer spec pulls a CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[workflow,liftover,dev]"
