#!/bin/bash
# Post-deploy step of envs/baseline-scpram.yaml (Snakemake runs it in the new conda env; epiflow's
# venv builder runs it with $EPIFLOW_PIP pointing at the venv): the tool without its declared
# dependencies, whose pins have no Python 3.11 wheels (see the yaml's header); the yaml's pip list
# is the set its code imports.
set -euo pipefail
PIP=${EPIFLOW_PIP:-python -m pip}
$PIP install --no-deps scpram==0.0.3
