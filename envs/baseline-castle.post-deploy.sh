#!/bin/bash
# Post-deploy step of envs/baseline-castle.yaml (Snakemake runs it in the new conda env; epiflow's
# venv builder runs it with $EPIFLOW_PIP pointing at the venv): sccastle without its declared
# dependencies ('umap>=0.1.1' has no installable distribution; 'numpy==1.23.1' has no Python 3.11
# wheel), which the yaml's pip list replaces by the set its code imports.
set -euo pipefail
PIP=${EPIFLOW_PIP:-python -m pip}
$PIP install --no-deps sccastle==1.0.2
