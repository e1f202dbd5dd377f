#!/bin/bash
# Post-deploy step of envs/baseline-castle.yaml (Snakemake runs it in the new conda env; epiflow's
# venv builder runs it with $EPIFLOW_PIP pointing at the venv): sccastle without its declared
# dependencies ('umap>=0.1.1' has no installable distribution; 'numpy==1.23.1' has no Python 3.11
# wheel), which the yaml's pip list replaces by the set its code imports.
set -euo pipefail
PIP=${EPIFLOW_PIP:-python -m pip}
# exact version, its files' sha256 checked (pip reads hashes only from a requirements file)
req=$(mktemp)
trap 'rm -f "$req"' EXIT
echo "sccastle==1.0.2 --hash=sha256:36f0d81cd2333908feb377d80d4567940a0b444e633b2b307ef3777fb0766a64 --hash=sha256:cd53af00efe725e03a8292585aaee114e337cf63b141ef995e2526de63e48747" > "$req"
$PIP install --no-deps --require-hashes -r "$req"
