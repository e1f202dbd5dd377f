#!/bin/bash
# Post-deploy step of envs/baseline-scpram.yaml (Snakemake runs it in the new conda env; epiflow's
# venv builder runs it with $EPIFLOW_PIP pointing at the venv): the tool without its declared
# dependencies, whose pins have no Python 3.11 wheels (see the yaml's header); the yaml's pip list
# is the set its code imports.
set -euo pipefail
PIP=${EPIFLOW_PIP:-python -m pip}
# exact version, its files' sha256 checked (pip reads hashes only from a requirements file)
req=$(mktemp)
trap 'rm -f "$req"' EXIT
echo "scpram==0.0.3 --hash=sha256:8d69bfd91f307ebb752f364e023a7c88aeb836aec74513b3ed83abcc7a1e0b74 --hash=sha256:d634bef1b3d19ab776df80cc4a330f52689e40ee7b7437d0490ca37a70e55154" > "$req"
$PIP install --no-deps --require-hashes -r "$req"
