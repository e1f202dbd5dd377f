#!/usr/bin/env bash
# The test suite: creates .venv on first use (scripts/setup_env.sh), then runs pytest.
#
#   bash scripts/run_tests.sh [pytest arguments]
#
# Tests that need ../shared (golden fixtures, real data) skip with a reason when it is absent
# (set EPIFLOW_SHARED to its location). Exit status: pytest's; "no tests collected" is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "run_tests.sh: pytest collected no tests" >&2
fi
exit "$rc"
