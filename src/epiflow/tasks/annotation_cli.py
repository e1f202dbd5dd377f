"""``epiflow annotate``: fine-tune a cell-type classifier on the reference 2/3 of the labelled cells and
annotate the query 1/3, beside LSI + logistic regression / linear SVM baselines."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_common_finetune_args(p: argparse.ArgumentParser, *, epochs: int, lr: float, batch_size: int) -> None:
    p.add_argument("--corpus", required=True, help="corpus folder (epiflow build-corpus) or a shard .h5")
    p.add_argument("--checkpoint", required=True,
                   help="pretrained model: checkpoint.pth of epiflow pretrain (with its .json side file) "
                        "or the authors' file (then give --num-heads unless the width is 512)")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--dataset", help="use only the cells whose obs 'dataset' is NAME")
    p.add_argument("--label-key", default="cell_type", help="obs column with the cell types (default cell_type)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"fine-tuning epochs (default {epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate of the encoder (default {lr:g})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"cells per step (default {batch_size})")
    p.add_argument("--max-len", type=int, help="tokens per cell (default: the model's rank limit - 2)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (tests, quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-heads", type=int, help="attention heads (if the checkpoint has no side file)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=["sdpa", "packed", "flash", "auto"],
                   help="attention backend (default auto: on CPU packed while fine-tuning, padded sdpa "
                        "for inference; on CUDA flash-attn if installed, else packed)")
    p.add_argument("--lsi-components", type=int, default=50, help="SVD components of the LSI baseline")
    p.add_argument("--trainer", choices=["task", "shared"], default="task",
                   help="fine-tuning loop: task = this task's loop (default; supports --max-steps), shared = "
                        "epiflow.train.finetune (token-budget batches, cosine schedule)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--svg", action="store_true", help="also write SVG figures")


def _annotate(args: argparse.Namespace) -> int:
    from .annotation import annotate

    _, metrics = annotate(
        args.corpus, args.checkpoint, args.label_key, head=args.head, epochs=args.epochs, lr=args.lr,
        head_lr=args.head_lr, batch_size=args.batch_size, max_len=args.max_len, seed=args.seed,
        out_dir=args.out_dir, dataset=args.dataset, query_fraction=args.query_fraction, max_steps=args.max_steps,
        num_heads=args.num_heads, device=args.device, backend=args.backend, focal_gamma=args.focal_gamma,
        lsi_components=args.lsi_components, baselines=not args.no_baselines, save_model=args.save_model,
        figures=not args.no_figures, svg=args.svg, trainer=args.trainer)
    show = metrics[metrics["metric"].isin(["accuracy", "macro_F1", "balanced_accuracy"])]
    print(show.pivot_table(index="method", columns="metric", values="value", sort=False).to_string())
    print(f"wrote {Path(args.out_dir) / 'metrics.tsv'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "annotate",
        help="supervised annotation: fine-tune a classifier on the reference cells, predict the query; vs LSI",
        description=(
            "Seeded stratified split of the labelled cells (2/3 reference, 1/3 query), fine-tuning of the "
            "pretrained model plus a classifier on the cell embedding end to end on the reference (linear + "
            "cross-entropy as in the paper, or the authors' MLP + focal loss), predictions for every cell. "
            "Baselines on the same reference cells: LSI + logistic regression, LSI + linear SVM, and logistic "
            "regression on the frozen zero-shot embeddings. Writes OUT_DIR/metrics.tsv (task, dataset, method, "
            "metric, value; accuracy, macro F1, ... on the query cells), predictions.tsv, confusion.tsv, "
            "train_log.tsv, confusion.png, sankey.png [, finetuned.pth]."))
    add_common_finetune_args(p, epochs=20, lr=5e-4, batch_size=32)
    p.add_argument("--head", choices=["linear", "mlp_focal"], default="linear",
                   help="classifier: linear + cross-entropy (paper) or the authors' MLP + focal loss")
    p.add_argument("--head-lr", type=float, help="learning rate of the classifier (default 10 x --lr)")
    p.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss gamma (mlp_focal; default 2)")
    p.add_argument("--query-fraction", type=float, default=1 / 3, help="fraction of each type in the query")
    p.add_argument("--no-baselines", action="store_true", help="skip the LSI / frozen-embedding baselines")
    p.add_argument("--save-model", action="store_true", help="also write the fine-tuned model (finetuned.pth)")
    p.set_defaults(func=_annotate)
