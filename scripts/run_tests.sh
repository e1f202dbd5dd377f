#!/usr/bin/env bash
# The test suite: creates .venv on first use (scripts/setup_env.sh), runs the static checks
# (scripts/lint.sh: ruff, mypy), then pytest. CI (.ci/run) runs it without arguments: the full suite.
#
#   bash scripts/run_tests.sh [pytest arguments]
#   bash scripts/run_tests.sh -m "not slow"     # the inner loop: everything but the end-to-end runs
#
# Tests that need ../shared (golden fixtures, real data) skip with a reason when it is absent
# (set EPIFLOW_SHARED to its location). Exit status: pytest's, or 1 when only the static checks
# failed; "no tests collected" is a failure. EPIFLOW_NO_LINT=1 skips the static checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
lint=0
if [ -z "${EPIFLOW_NO_LINT:-}" ]; then
  bash scripts/lint.sh || lint=1
fi
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "run_tests.sh: pytest collected no tests" >&2
fi
if [ "$rc" -eq 0 ] && [ "$lint" -ne 0 ]; then
  echo "run_tests.sh: the tests passed but the static checks failed (scripts/lint.sh)" >&2
  rc=1
fi
exit "$rc"
