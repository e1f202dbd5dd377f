#!/usr/bin/env bash
# Refresh the lock files: exact versions and sha256 hashes for Python 3.11 on linux x86-64.
#
#   bash scripts/lock.sh              # requirements/lock.txt and every envs/baseline-*.lock.txt
#   bash scripts/lock.sh main         # only requirements/lock.txt (the main environment)
#   bash scripts/lock.sh lsi pca      # only those baseline environments
#
# The main lock resolves pyproject.toml's extras workflow, liftover and dev plus requirements/lock.in
# (build backend, pip); a baseline lock resolves envs/baseline-<tool>.in, and the pip list of
# envs/baseline-<tool>.yaml (the conda spec) is rewritten from it as exact pins. torch is left out of
# every lock (scripts/setup_env.sh and the baseline builder install `torch==2.13.0` first, which on this
# kind of machine is a local CPU wheel whose hash differs from the index's build), and so are the
# CUDA-only packages that torch's index build pulls in on linux (nvidia-*, cuda-*, triton); torch's
# other dependencies (sympy, networkx, filelock, jinja2, fsspec, ...) are locked.
# Needs network access to the package index; uv (pinned below) is installed into .lock-venv/ once.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
if [ -z "${UV:-}" ]; then
  if [ ! -x .lock-venv/bin/uv ] || [ "$(.lock-venv/bin/uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    "${PYTHON:-python3}" -m venv .lock-venv
    .lock-venv/bin/python -m pip install --quiet "uv==$UV_VERSION"
  fi
  UV=.lock-venv/bin/uv
fi
COMMON=(--generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet
        --custom-compile-command "bash scripts/lock.sh")

# compile OUT INPUT... : resolve twice; the second pass leaves out torch and what only its CUDA build needs
compile() {
  local out=$1; shift
  local tmp; tmp=$(mktemp)
  "$UV" pip compile "${COMMON[@]}" "$@" -o "$tmp" >/dev/null
  local skip=(--no-emit-package torch)
  local name
  for name in $(grep -oE '^(nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+|triton)==' "$tmp" | tr -d '='); do
    skip+=(--no-emit-package "$name")
  done
  rm -f "$tmp"
  "$UV" pip compile "${COMMON[@]}" "${skip[@]}" "$@" -o "$out"
  echo "lock.sh: wrote $out ($(grep -cE '^[A-Za-z0-9]' "$out") packages)" >&2
}

lock_main() {
  compile requirements/lock.txt pyproject.toml --extra workflow --extra liftover --extra dev requirements/lock.in
}

# A baseline's .in file may leave packages out of its lock with a line `# lock: omit PKG [PKG ...]`
# (a dependency the tool imports only for a feature epiflow never calls, e.g. one that builds from
# source); the environment installs the lock with --no-deps, so the omitted packages are not installed.
lock_baseline() {
  local tool=$1 in=envs/baseline-$1.in
  [ -f "$in" ] || { echo "lock.sh: no $in (the pip requirements of baseline '$tool')" >&2; exit 1; }
  local omit=() pkg
  for pkg in $(sed -n 's/^# *lock: *omit *//p' "$in"); do omit+=(--no-emit-package "$pkg"); done
  compile "envs/baseline-$tool.lock.txt" "$in" "${omit[@]}"
  "${PYTHON:-python3}" scripts/baseline_yaml.py "$tool"
}

if [ $# -eq 0 ]; then
  lock_main
  for f in envs/baseline-*.in; do t=${f#envs/baseline-}; lock_baseline "${t%.in}"; done
else
  for t in "$@"; do
    if [ "$t" = main ]; then lock_main; else lock_baseline "$t"; fi
  done
fi
