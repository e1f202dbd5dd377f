"""``epiflow annotate``: fine-tune a cell-type classifier on the reference 2/3 of the labelled cells and
annotate the query 1/3, beside LSI + logistic regression / linear SVM baselines.

The flags of the settings are generated from :class:`epiflow.tasks.config.AnnotationConfig`; the I/O
flags are the common ones (:func:`epiflow.cliargs.add_io_args`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cliargs import add_config_args, add_io_args, config_from_args
from .config import AnnotationConfig


def _annotate(args: argparse.Namespace) -> int:
    from ..report.results import write_task_result
    from .annotation import run
    from .common import load_inputs

    cfg = config_from_args(AnnotationConfig, args)
    cells, model = load_inputs(args.corpus, args.checkpoint, cfg, df=args.df, dataset=args.dataset)
    res = run(cells, model, cfg, dataset=args.dataset)
    out = Path(args.out)
    write_task_result(res, out, models=cfg.save_model)
    if cfg.figures:
        from ..plots.annotation import annotation_figures

        annotation_figures(res, out, svg=cfg.svg)
    metrics = res.metrics
    show = metrics[metrics["metric"].isin(["accuracy", "macro_F1", "balanced_accuracy"])]
    print(show.pivot_table(index="method", columns="metric", values="value", sort=False).to_string())
    print(f"wrote {out / 'metrics.tsv'}")
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
            "regression on the frozen zero-shot embeddings. Writes OUT/metrics.tsv (task, dataset, method, "
            "metric, value; accuracy, macro F1, ... on the query cells), predictions.tsv, confusion.tsv, "
            "train_log.tsv, confusion.png, sankey.png [, finetuned.pth, classes.json]."))
    add_io_args(p)
    add_config_args(p, AnnotationConfig, group="settings")
    p.set_defaults(func=_annotate)
