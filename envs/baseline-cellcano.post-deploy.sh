#!/bin/bash
# Post-deploy step of envs/baseline-cellcano.yaml (Snakemake runs it in the new conda env; epiflow's
# venv builder runs it with $EPIFLOW_PIP pointing at the venv): the tool without its declared
# dependencies, whose pins have no Python 3.11 wheels (see the yaml's header); the yaml's pip list
# is the set its code imports.
set -euo pipefail
PIP=${EPIFLOW_PIP:-python -m pip}
# exact version, its files' sha256 checked (pip reads hashes only from a requirements file)
req=$(mktemp)
trap 'rm -f "$req"' EXIT
echo "cellcano==1.0.4 --hash=sha256:0821149683da14a72e059c5637d7ed73efe6b94bf60fad3798dbfeecc118b371" > "$req"
$PIP install --no-deps --require-hashes -r "$req"
