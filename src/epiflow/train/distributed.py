"""torchrun / DDP plumbing: NCCL on GPU, gloo on CPU; SLURM multi-node launch command.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init` reads them. Multi-node runs use torchrun's c10d rendezvous; :func:`slurm_torchrun_argv`
builds the per-node command from SLURM's environment (one ``srun`` task per node).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init(device: str | None = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    here = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        here = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, dev, here)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shutdown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def slurm_torchrun_argv(pretrain_args: list[str], nproc_per_node: int | None = None, port: int = 29500,
                        env: dict | None = None) -> list[str]:
    """``torchrun`` argv for one node of a SLURM allocation (run it with one srun task per node).

    Uses the c10d rendezvous on the first host of ``SLURM_JOB_NODELIST`` and ``SLURM_JOB_ID`` as the
    rendezvous id, so all nodes meet without a pre-set master address.
    """
    env = dict(os.environ if env is None else env)
    nnodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    if nproc_per_node is None:
        gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE", "")
        nproc_per_node = int(str(gpus).split(":")[-1]) if str(gpus).strip() else max(1, torch.cuda.device_count())
    head = env.get("MASTER_ADDR")
    if not head:
        nodelist = env.get("SLURM_JOB_NODELIST", "localhost")
        try:
            head = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                  capture_output=True, text=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            head = nodelist.split(",")[0]
    return ["torchrun", f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={head}:{port}",
            f"--rdzv_id={env.get('SLURM_JOB_ID', 'epiflow')}",
            "-m", "epiflow", "pretrain", *pretrain_args]
