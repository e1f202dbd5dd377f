#!/usr/bin/env bash
# The main job: the whole workflow on the embedded demo (simulated corpus, tiny model, CPU), then
# the HTML report and a printed summary. Creates .venv on first use (scripts/setup_env.sh).
#
#   bash scripts/run_demo.sh [extra snakemake arguments, e.g. --cores 4, --configfile FILE]
#
# Outputs: results/ (tables, figures, logs, benchmarks), results/summary.tsv, results/report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
# one BLAS / OpenMP thread per job: Snakemake runs jobs side by side on the available cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# where this run's results go (results_dir after --configfile / --config overrides)
RESULTS=$(python - "$@" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("config/config.yaml"))
args, mode = sys.argv[1:], None
for a in args:
    if a.startswith("-"):
        mode = a
    elif mode == "--configfile":
        cfg.update({k: v for k, v in (yaml.safe_load(open(a)) or {}).items() if k == "results_dir"})
    elif mode == "--config" and a.startswith("results_dir="):
        cfg["results_dir"] = a.split("=", 1)[1]
print(cfg["results_dir"])
PY
)

# the summary is printed once, below, after the report (the workflow's onsuccess would print it too)
export EPIFLOW_NO_ONSUCCESS_SUMMARY=1
snakemake all --profile profiles/local --cores "${EPIFLOW_CORES:-2}" "$@"
snakemake all --profile profiles/local --cores 1 "$@" --report "$RESULTS/report.html"
echo
echo "== epiflow demo finished: results in $RESULTS/, report $RESULTS/report.html =="
python -m epiflow summarize --table "$RESULTS/summary.tsv"
