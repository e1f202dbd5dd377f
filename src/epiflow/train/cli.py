"""CLI verbs: ``epiflow pretrain`` and ``epiflow pretrain-launch`` (multi-node torchrun under SLURM)."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``epiflow pretrain``: the I/O folders, ``--init``, and one flag per setting of
    :class:`~epiflow.train.config.PretrainConfig` (generated: the declaration is the dataclass)."""
    from ..cliargs import add_config_args
    from .config import PretrainConfig

    p.add_argument("--corpus", required=True, help="corpus folder (epiflow build-corpus)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (checkpoint.pth, train_state.pt, metrics.csv, ...)")
    p.add_argument("--init", choices=["authors", "bert"], default=None,
                   help="parameter initialisation: authors = PyTorch defaults, N(0, 1) embeddings (the preset's "
                        "default); bert = N(0, 0.02) for embeddings and linear layers (an option, issue #15)")
    add_config_args(p, PretrainConfig, group="pretraining settings")


def config_from_args(args):
    from .. import cliargs
    from .config import PretrainConfig

    return cliargs.config_from_args(PretrainConfig, args,
                                    model_overrides={} if args.init is None else {"init": args.init},
                                    clip_grad=args.clip_grad or None, k_schedule=tuple(args.k_schedule))


def _pretrain(args) -> int:
    import json
    import logging

    from .pretrain import pretrain

    from .resume import TrainingInterrupted

    try:
        summary = pretrain(args.corpus, args.out, config_from_args(args))
    except TrainingInterrupted as exc:
        logging.getLogger("epiflow.train").warning(
            "%s. Run the same command with --resume to continue from step %d.", exc, exc.step)
        return 128 + exc.signum
    if summary.get("eval"):
        logging.getLogger("epiflow.train").info("held-out CCA AUROC %.4f", summary["eval"]["cca_auroc"])
    print(json.dumps({k: summary[k] for k in ("steps", "world_size", "wall_s") if k in summary}
                     | {"eval": summary.get("eval")}))
    return 0


def _launch(args) -> int:
    import os
    import shlex

    from .distributed import slurm_torchrun_argv

    rest = list(args.pretrain_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not rest:
        raise ConfigError("no pretrain arguments given", field="pretrain_args",
                          fix="epiflow pretrain-launch --nproc-per-node 8 -- --corpus C --out O ...")
    argv = slurm_torchrun_argv(rest, args.nproc_per_node, args.port)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    os.execvp(argv[0], argv)
    return 0  # pragma: no cover


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="pretrain EpiAgent on a corpus (CCA + SR + RLM warm-up)",
                              description="Pretrain EpiAgent (SPEC §4). Multi-GPU: torchrun --nproc_per_node N "
                                          "-m epiflow pretrain ...; multi-node under SLURM: epiflow pretrain-launch.")
    add_pretrain_args(p)
    p.set_defaults(func=_pretrain)
    q = subparsers.add_parser("pretrain-launch", help="run pretraining with torchrun on this SLURM node",
                              description="Builds 'torchrun --nnodes $SLURM_JOB_NUM_NODES --nproc_per_node G "
                                          "--rdzv_backend c10d --rdzv_endpoint HEAD:PORT --rdzv_id $SLURM_JOB_ID "
                                          "-m epiflow pretrain ARGS' and runs it. Start one task per node: "
                                          "srun --ntasks-per-node=1 epiflow pretrain-launch -- ARGS")
    q.add_argument("--nproc-per-node", type=int, default=None, help="GPUs per node (default: from SLURM)")
    q.add_argument("--port", type=int, default=29500)
    q.add_argument("--dry-run", action="store_true", help="print the torchrun command only")
    q.add_argument("pretrain_args", nargs=argparse.REMAINDER, help="-- then the epiflow pretrain arguments")
    q.set_defaults(func=_launch)
