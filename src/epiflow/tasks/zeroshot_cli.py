"""CLI verbs of the zero-shot annotators: ``epiflow train-annotator`` and ``epiflow annotate-zeroshot``."""

from __future__ import annotations

import argparse


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="cells: corpus folder, shard .h5 or .h5ad of raw counts")
    p.add_argument("--df", help="df.npy of the model's corpus (for an .h5ad input without var['df'])")
    p.add_argument("--dataset", help="use only the cells whose obs 'dataset' is NAME (several: comma-separated)")
    p.add_argument("--num-heads", type=int, help="attention heads (if the checkpoint has no side file)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--out-dir", required=True, help="output folder")


def _train(args) -> int:
    from .zeroshot import load_cells, train_annotator

    cells = load_cells(args.input, df=args.df, dataset=args.dataset, max_cells=args.max_cells, seed=args.seed)
    res = train_annotator(args.checkpoint, cells, out_dir=args.out_dir, label_key=args.label_key,
                          label_map=args.label_map, num_heads=args.num_heads, classifier=args.classifier,
                          loss=args.loss, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                          lr=args.lr, head_lr=args.head_lr, freeze_encoder=args.freeze_encoder,
                          max_len=args.max_len, val_fraction=args.val_fraction, seed=args.seed, device=args.device,
                          dataset=args.dataset)
    t = res["metrics"]
    print(t[t["method"] == "validation"].to_string(index=False) if (t["method"] == "validation").any()
          else t.to_string(index=False))
    print(f"wrote {res['checkpoint']} ({len(res['classes'])} classes: {', '.join(res['classes'])})")
    return 0


def _annotate(args) -> int:
    from .zeroshot import annotate, load_cells

    cells = load_cells(args.input, df=args.df, dataset=args.dataset)
    res = annotate(args.checkpoint, cells, classes=args.classes, num_heads=args.num_heads,
                   label_key=args.label_key, label_map=args.label_map,
                   min_class_fraction=None if args.no_mask else args.min_class_fraction,
                   out_dir=args.out_dir, dataset=args.dataset, device=args.device, max_len=args.max_len,
                   method=args.method,
                   restrict_ccres=(None if args.restrict_ccres is None
                                   else True if args.restrict_ccres == "auto" else args.restrict_ccres))
    t = res["metrics"]
    show = t[t["metric"].isin(["accuracy", "micro_F1", "balanced_accuracy", "macro_F1"])]
    if len(show):
        print(show.pivot_table(index="method", columns="metric", values="value", sort=False).to_string())
    print(res["predictions"]["prediction"].value_counts().to_string())
    if res["masked_classes"]:
        print(f"masked classes (< {args.min_class_fraction:.2%} of cells): {', '.join(res['masked_classes'])}")
    print(f"wrote {args.out_dir}/predictions.tsv and metrics.tsv")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-annotator",
        help="zero-shot annotator: fine-tune a pretrained EpiAgent + classifier on a labelled atlas",
        description=(
            "Fine-tune a pretrained EpiAgent checkpoint with the authors' supervised classifier head "
            "(512-256-128-C MLP, focal loss) on labelled cells whose labels are coarsened with a label map "
            "(TSV source<TAB>target; unmapped cells are dropped). Writes OUT_DIR/checkpoint.pth in the "
            "authors' supervised format (+ .json config side file), classes.tsv, reference_ccres.npy (cCREs "
            "accessible in the training cells), train_log.tsv and "
            "metrics.tsv (held-out validation accuracy, micro/macro F1, balanced accuracy)."))
    p.add_argument("--checkpoint", required=True, help="pretrained EpiAgent checkpoint (.pth)")
    _input_args(p)
    p.add_argument("--label-key", default="cell_type", help="obs column with the labels (default cell_type)")
    p.add_argument("--label-map", help="label-map TSV coarsening the labels (resources/label_maps/)")
    p.add_argument("--classifier", choices=["mlp", "linear"], default="mlp",
                   help="mlp = authors' 512-256-128-C head (default), linear = the paper's single layer")
    p.add_argument("--loss", choices=["focal", "ce"], default="focal", help="focal (authors, default) or ce")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training cells (default 3)")
    p.add_argument("--max-steps", type=int, help="stop after N optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4, help="encoder learning rate (default 1e-4)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="classifier learning rate (default 1e-3)")
    p.add_argument("--freeze-encoder", action="store_true", help="train the classifier only")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per cell in training (default 2048)")
    p.add_argument("--max-cells", type=int, help="train on a random subset of N cells")
    p.add_argument("--val-fraction", type=float, default=0.1, help="stratified held-out fraction (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train)

    q = subparsers.add_parser(
        "annotate-zeroshot",
        help="annotate new cells with a supervised (annotator) checkpoint, no training",
        description=(
            "Predict cell types with a supervised EpiAgent checkpoint (epiflow train-annotator, or the "
            "authors' EpiAgent-B / -NT with a classes.tsv). With --label-key the known labels (through "
            "--label-map) score the predictions: accuracy, micro F1, balanced accuracy, macro F1; classes "
            "predicted for fewer than --min-class-fraction of the cells are masked and scored as "
            "'<method>-masked'. Writes OUT_DIR/predictions.tsv, metrics.tsv, confusion.png."))
    q.add_argument("--checkpoint", required=True, help="supervised checkpoint (.pth)")
    q.add_argument("--classes", help="classes.tsv (index, label); default: beside the checkpoint")
    _input_args(q)
    q.add_argument("--label-key", help="obs column with known labels to score against")
    q.add_argument("--label-map", help="label-map TSV mapping the known labels onto the classifier's classes")
    q.add_argument("--min-class-fraction", type=float, default=0.005,
                   help="mask classes predicted for fewer than this fraction of cells (default 0.005)")
    q.add_argument("--no-mask", action="store_true", help="do not compute masked predictions")
    q.add_argument("--method", default="EpiAgent-zeroshot",
                   help="method name of the metric rows (default EpiAgent-zeroshot; e.g. EpiAgent-B, "
                        "EpiAgent-NT when a run has several annotators)")
    q.add_argument("--max-len", type=int, default=8190, help="top tokens per cell (default 8190)")
    q.add_argument("--restrict-ccres", nargs="?", const="auto", metavar="NPY",
                   help="drop the cCREs the annotator never saw accessible in training (reference_ccres.npy "
                        "beside the checkpoint, or this .npy of cCRE indices): for references measured on a "
                        "smaller peak panel than the new data")
    q.set_defaults(func=_annotate)
