#!/usr/bin/env bash
# The main job: the whole workflow on the embedded demo (simulated corpus, tiny model, CPU), then
# the HTML report and a printed summary. Creates .venv on first use (scripts/setup_env.sh).
#
#   bash scripts/run_demo.sh [extra snakemake arguments, e.g. --cores 4 or --configfile FILE]
#
# Outputs: results/ (tables, figures, logs, benchmarks), results/summary.tsv, results/report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
# one BLAS / OpenMP thread per job: Snakemake runs jobs side by side on the available cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

snakemake --profile profiles/local --cores "${EPIFLOW_CORES:-2}" "$@" all
RESULTS=$(python - "$@" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("config/config.yaml"))
args = sys.argv[1:]
for i, a in enumerate(args):  # --configfile FILE overrides results_dir like Snakemake does
    if a == "--configfile" and i + 1 < len(args):
        over = yaml.safe_load(open(args[i + 1])) or {}
        cfg["results_dir"] = over.get("results_dir", cfg["results_dir"])
print(cfg["results_dir"])
PY
)
snakemake --profile profiles/local --cores 1 "$@" --report "$RESULTS/report.html" all
echo
echo "== epiflow demo: results in $RESULTS/ (report: $RESULTS/report.html) =="
cat "$RESULTS/logs/summarize.log" | grep -v " INFO " || true
