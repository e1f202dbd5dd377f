#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install epiflow with everything
# the workflow and the tests need, at the exact versions and sha256 hashes of requirements/lock.txt
# (Python 3.11, linux x86-64; refresh it with `bash scripts/lock.sh main`). Idempotent: once
# installed, it only re-installs when pyproject.toml or the lock changed (a stamp file in .venv
# records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/lock.txt
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "setup_env.sh: $PY is missing or older than Python 3.10 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
  "$PY" -m venv .venv
fi
STAMP=.venv/.epiflow-installed
WANT="$(.venv/bin/python -c 'import hashlib, sys; print(sys.version.split()[0], *(hashlib.sha256(open(f, "rb").read()).hexdigest() for f in sys.argv[1:]))' pyproject.toml "$LOCK")"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c "import epiflow, snakemake, pytest" 2>/dev/null; then
  exit 0
fi
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup_env.sh: warning: $LOCK is for Python 3.11; .venv has $(.venv/bin/python -V 2>&1) (set PYTHON=/path/to/python3.11 and remove .venv)" >&2
fi
echo "setup_env.sh: installing epiflow and its locked dependencies into .venv (first run: a few minutes)" >&2
# 1. every dependency at its locked version, each file checked against its sha256 (torch excluded)
.venv/bin/python -m pip install --quiet --require-hashes --no-deps -r "$LOCK"
# 2. torch 2.13.0: the CPU wheel available offline on this kind of machine (any other spec pulls a
#    multi-GB CUDA build); elsewhere the index's build, with the CUDA libraries it needs on linux.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# 3. epiflow itself, editable, built with the locked setuptools (no download at build time)
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
# 4. every installed package's requirements are met
.venv/bin/python -m pip check
echo "$WANT" > "$STAMP"
