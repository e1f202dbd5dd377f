"""CLI verbs: ``epiflow pretrain`` and ``epiflow pretrain-launch`` (multi-node torchrun under SLURM)."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def _k_schedule(text: str) -> tuple:
    try:
        ks = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k-schedule must be comma-separated integers, got {text!r}") from None
    if not ks:
        raise argparse.ArgumentTypeError("--k-schedule is empty")
    return ks


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", required=True, help="corpus folder (epiflow build-corpus)")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pth, train_state.pt, metrics.csv, ...)")
    p.add_argument("--model-config", default="tiny", help="preset tiny|small|paper or a JSON file (default tiny)")
    p.add_argument("--dropout", type=float, default=None, help="override the model dropout")
    p.add_argument("--init", choices=["authors", "bert"], default=None,
                   help="parameter initialisation: authors = PyTorch defaults, N(0, 1) embeddings (the preset's "
                        "default); bert = N(0, 0.02) for embeddings and linear layers (an option, issue #15)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (inverse_sqrt: see --schedule)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant", "inverse_sqrt"],
                   help="warm-up + decay (cosine/linear), constant, or the authors' inverse_sqrt LambdaLR "
                        "whose peak is lr/sqrt(warmup)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of the steps, <= 2000)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip (0 = off)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per GPU and micro-batch")
    p.add_argument("--max-cells", type=int, default=None, help="cap on cells per GPU and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=None,
                   help="sentence cap, longer ones are subsampled at random each step "
                        "(default min(8190, model max_rank - 2))")
    p.add_argument("--k-schedule", type=_k_schedule, default=(1, 2, 5),
                   help="CCA negatives per positive, one value per block of epochs (default 1,2,5)")
    p.add_argument("--k-epochs-per-block", type=int, default=None, help="epochs per K block (default epochs/len)")
    p.add_argument("--rlm-epochs", type=int, default=2, help="RLM warm-up epochs (default 2)")
    p.add_argument("--cca-max-pos", type=int, default=None,
                   help="cap CCA positives per cell (default: all accessible cCREs, as the paper)")
    p.add_argument("--cca-negatives", choices=["uniform", "df"], default="uniform",
                   help="CCA negatives drawn uniformly from the inaccessible cCREs (default, the paper) or in "
                        "proportion to their corpus document frequency (df: popularity-matched, issue #15)")
    p.add_argument("--sr-objective", choices=["bce", "multinomial"], default="bce",
                   help="SR loss: bce (the paper: BCE over every cCRE, pos_weight 100) or "
                        "multinomial (softmax over the cCREs, depth-invariant; an option, docs/results_notes.md #15)")
    p.add_argument("--w-sr", type=float, default=1.0, help="weight of the SR loss (default 1, the paper's sum)")
    p.add_argument("--w-cca", type=float, default=1.0, help="weight of the CCA loss (default 1)")
    p.add_argument("--w-rlm", type=float, default=1.0, help="weight of the RLM loss (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held-out cells for eval.json")
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from the training state (OUT/train_state.pt, or in --state-dir) if "
                        "there is one; without --resume a folder holding a state is refused")
    p.add_argument("--state-dir", default=None,
                   help="folder of train_state.pt (default: OUT); the workflow keeps it outside its outputs")
    p.add_argument("--restart-if-changed", action="store_true",
                   help="with --resume: a state made with other settings is set aside (train_state.pt.previous) "
                        "and the run starts afresh, instead of an error")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda[:i]")
    p.add_argument("--backend", default="auto", help="attention backend auto|sdpa|packed|flash")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model forward")
    p.add_argument("--memory-lean", action="store_true",
                   help="no table-sized gradients (rebuilt chunk by chunk from per-step records), sparse "
                        "input-token gradients, row-wise AdamW states for the cCRE embedding and decoder")
    p.add_argument("--lean-momentum", action="store_true", help="memory-lean: keep a bf16 first moment")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--window-shards", type=int, default=2, help="shards shuffled together (streaming window)")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args):
    from .pretrain import PretrainConfig

    return PretrainConfig(
        model_config=args.model_config, dropout=args.dropout,
        model_overrides={} if args.init is None else {"init": args.init}, epochs=args.epochs, max_steps=args.max_steps,
        lr=args.lr, schedule=args.schedule, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay, clip_grad=(args.clip_grad or None), batch_tokens=args.batch_tokens,
        max_cells=args.max_cells, grad_accum=args.grad_accum, max_len=args.max_len,
        k_schedule=tuple(args.k_schedule), k_epochs_per_block=args.k_epochs_per_block,
        rlm_epochs=args.rlm_epochs, cca_max_pos=args.cca_max_pos,
        cca_negatives=args.cca_negatives, sr_objective=args.sr_objective, w_sr=args.w_sr, w_cca=args.w_cca, w_rlm=args.w_rlm, seed=args.seed,
        eval_fraction=args.eval_fraction, ckpt_every=args.ckpt_every, resume=args.resume, device=args.device,
        backend=args.backend, precision=args.precision, compile=args.compile, memory_lean=args.memory_lean,
        lean_momentum=args.lean_momentum, gradient_checkpointing=args.gradient_checkpointing,
        num_workers=args.num_workers, window_shards=args.window_shards, tensorboard=args.tensorboard,
        progress=not args.no_progress, state_dir=getattr(args, "state_dir", None),
        restart_if_changed=getattr(args, "restart_if_changed", False))


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
