#!/usr/bin/env bash
# The test suite: creates .venv on first use (scripts/setup_env.sh), runs the static checks
# (scripts/lint.sh: ruff, mypy), then pytest. CI (.ci/run) runs it without arguments: the full suite.
#
#   bash scripts/run_tests.sh [pytest arguments]
#   bash scripts/run_tests.sh -m "not slow"     # the inner loop: everything but the end-to-end runs
#   EPIFLOW_TEST_WORKERS=0 bash scripts/run_tests.sh tests/test_model.py   # one process (no xdist)
#
# The tests run in parallel processes (pytest-xdist, one per CPU, at most 4; a test file stays in one
# process, so its module fixtures are built once), each with one OpenMP thread unless OMP_NUM_THREADS
# is set: most tests are too small for a second thread to help, and a second process does.
# EPIFLOW_TEST_WORKERS sets the number of processes (0 = run in this process); pytest's own -n wins.
#
# Tests that need ../shared (golden fixtures, real data) skip with a reason when it is absent
# (set EPIFLOW_SHARED to its location). Exit status: pytest's, or 1 when only the static checks
# failed; "no tests collected" is a failure. EPIFLOW_NO_LINT=1 skips the static checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
workers=${EPIFLOW_TEST_WORKERS:-auto}
xdist=()
case " $* " in *" -n "*|*" --numprocesses"*|*" -p no:xdist "*) workers=given ;; esac
if [ "$workers" != "0" ] && [ "$workers" != "given" ] && python -c "import xdist" 2>/dev/null; then
  xdist=(-n "$workers" --maxprocesses 4 --dist loadfile)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
fi
lint=0
if [ -z "${EPIFLOW_NO_LINT:-}" ]; then
  bash scripts/lint.sh || lint=1
fi
set +e
python -m pytest -q "${xdist[@]}" "$@"
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
