#!/usr/bin/env bash
# The static checks CI runs before the tests (scripts/run_tests.sh calls this; pre-commit runs the
# same tools on the files you commit, see .pre-commit-config.yaml):
#   1. ruff check: lint of every Python file (rules in pyproject.toml [tool.ruff.lint]);
#   2. ruff format --check: the files kept formatted (FORMATTED below). The code base is formatted file
#      by file, not at once (parallel work would conflict): once a file is formatted (`ruff format
#      FILE`, or the pre-commit hook on commit), add it here;
#   3. mypy: src/epiflow/model and src/epiflow/train (pyproject.toml [tool.mypy]).
#   4. snakefmt --check on the workflow is a test (tests/test_workflow.py).
#
#   bash scripts/lint.sh      # uses .venv/bin (scripts/setup_env.sh); BIN=/other/bin to change
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
FORMATTED=(
  scripts/baseline_yaml.py
  src/epiflow/__main__.py
  src/epiflow/baselines/__init__.py
  src/epiflow/baselines/adapters/__init__.py
  src/epiflow/cli.py
  src/epiflow/corpus/__init__.py
  src/epiflow/genome/__init__.py
  src/epiflow/io.py
  src/epiflow/metrics/classification.py
  src/epiflow/model/derive.py
  src/epiflow/model/losses.py
  src/epiflow/plots/__init__.py
  src/epiflow/report/__init__.py
  src/epiflow/simulate/__init__.py
  src/epiflow/tasks/__init__.py
  tests/test_annotation_metrics.py
  tests/test_model_derive.py
)
rc=0
"$BIN/ruff" check --quiet . || rc=1
"$BIN/ruff" format --check --quiet "${FORMATTED[@]}" || { echo "lint.sh: run: $BIN/ruff format <the files above>" >&2; rc=1; }
"$BIN/mypy" || rc=1
if [ "$rc" -ne 0 ]; then
  echo "lint.sh: static checks failed (see above)" >&2
fi
exit "$rc"
