#!/usr/bin/env bash
# Run `epiflow pretrain` on this node: directly for one device, under torchrun for several.
#
#   torchrun_launch.sh [epiflow pretrain arguments...]
#
# Multi-node pretraining under SLURM (the executor plugin's MPI mode) puts
# `srun --ntasks-per-node=1` in front of this script, so every node of the allocation runs one copy.
# Each copy hands over to `epiflow pretrain-launch`, which starts one torchrun per node with one
# worker per GPU of the node (--nproc-per-node from SLURM_GPUS_ON_NODE, or EPIFLOW_GPUS_PER_NODE),
# and the torchruns meet through the c10d rendezvous (--rdzv-backend c10d --rdzv-endpoint
# $MASTER:29500, MASTER = first host of the allocation, --rdzv-id $SLURM_JOB_ID).
# With one node and at most one device (the local demo) the step simply runs in this process.
# The Python it runs: $EPIFLOW_PYTHON (the workflow passes the interpreter of its jobs), else `python`.
set -euo pipefail
PY=${EPIFLOW_PYTHON:-python}

NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
NPROC=${EPIFLOW_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [ -z "$NPROC" ]; then
  NPROC=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
NPROC=${NPROC##*:}  # SLURM may report "type:N"
PORT=${EPIFLOW_RDZV_PORT:-29500}

if [ "$NNODES" -le 1 ] && [ "$NPROC" -le 1 ]; then
  exec "$PY" -m epiflow pretrain "$@"
fi

echo "torchrun_launch: $(hostname): nnodes=$NNODES nproc_per_node=$NPROC port=$PORT" >&2
exec "$PY" -m epiflow pretrain-launch --nproc-per-node "$NPROC" --port "$PORT" -- "$@"
