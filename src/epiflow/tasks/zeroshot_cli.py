"""CLI verbs of the zero-shot annotators: ``epiflow train-annotator`` and ``epiflow annotate-zeroshot``.

Their flags come from :class:`epiflow.tasks.config.AnnotatorConfig` / :class:`~epiflow.tasks.config.ZeroshotConfig`
plus the I/O flags of :func:`epiflow.cliargs.add_io_args` and the input files ``--label-map``,
``--classes`` and ``--restrict-ccres``; :func:`epiflow.tasks.zeroshot.run_train` /
:func:`~epiflow.tasks.zeroshot.run_annotate` compute, this module writes.
"""

from __future__ import annotations

from pathlib import Path


def write_annotator(result, out) -> Path:
    """The annotator folder: ``checkpoint.pth`` (+ ``.json`` side file), ``classes.tsv``,
    ``reference_ccres.npy``, ``train_log.tsv`` and ``metrics.tsv``. Returns the checkpoint's path."""
    import numpy as np

    from ..io import atomic_path
    from ..report.results import write_task_result
    from .zeroshot import REFERENCE_CCRES_FILE

    out = Path(out)
    write_task_result(result, out, models=True)
    with atomic_path(out / REFERENCE_CCRES_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(result.data["reference_ccres"], dtype=np.int64))
    return out / "checkpoint.pth"


def write_annotation(result, out) -> None:
    """``predictions.tsv``, ``cells.tsv`` (labels, predictions and the UMAP of the annotator's cell
    embeddings), ``confusion.png`` (with known labels) and ``metrics.tsv`` in ``out``."""
    from ..io import atomic_path
    from ..metrics.table import write_metrics
    from ..plots.zeroshot import confusion_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = result.data["predictions"]
    with atomic_path(out / "predictions.tsv") as tmp:
        res.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    with atomic_path(out / "cells.tsv") as tmp:
        result.data["cells"].to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    if "label_mapped" in res:
        confusion_figure(res, out / "confusion.png")
    write_metrics(result.metrics, out / "metrics.tsv")


def _train(args) -> int:
    from ..cliargs import config_from_args
    from .common import load_cells, load_model
    from .config import AnnotatorConfig
    from .zeroshot import run_train

    cfg = config_from_args(AnnotatorConfig, args)
    cells = load_cells(args.corpus, df=args.df, dataset=args.dataset, max_cells=cfg.max_cells, seed=cfg.seed)
    # on the CPU: only the weights of its encoder are copied into the annotator (built on cfg.device)
    base = load_model(args.checkpoint, n_ccres=cells.n_ccres, vocab_id=cells.vocab_id, num_heads=cfg.num_heads, backend=cfg.backend)
    res = run_train(base, cells, cfg, label_map=args.label_map, dataset=args.dataset)
    del base
    ckpt = write_annotator(res, args.out)
    t = res.metrics
    print(t[t["method"] == "validation"].to_string(index=False) if (t["method"] == "validation").any()
          else t.to_string(index=False))
    classes = res.data["classes"]
    print(f"wrote {ckpt} ({len(classes)} classes: {', '.join(classes)})")
    return 0


def _annotate(args) -> int:
    from ..cliargs import config_from_args
    from .common import load_cells, load_model
    from .config import ZeroshotConfig
    from .zeroshot import CLASSES_FILE, REFERENCE_CCRES_FILE, read_classes, read_reference_ccres, run_annotate

    cfg = config_from_args(ZeroshotConfig, args)
    cells = load_cells(args.corpus, df=args.df, dataset=args.dataset)
    model = load_model(args.checkpoint, num_heads=cfg.num_heads, backend=cfg.backend)
    classes = read_classes(args.classes or Path(args.checkpoint).with_name(CLASSES_FILE))
    keep = None
    if args.restrict_ccres is not None:
        keep = read_reference_ccres(Path(args.checkpoint).with_name(REFERENCE_CCRES_FILE)
                                    if args.restrict_ccres == "auto" else args.restrict_ccres)
    res = run_annotate(model, cells, classes, cfg, label_map=args.label_map, dataset=args.dataset,
                       restrict_ccres=keep)
    write_annotation(res, args.out)
    t = res.metrics
    show = t[t["metric"].isin(["accuracy", "micro_F1", "balanced_accuracy", "macro_F1"])]
    if len(show):
        print(show.pivot_table(index="method", columns="metric", values="value", sort=False).to_string())
    print(res.data["predictions"]["prediction"].value_counts().to_string())
    if res.data["masked_classes"]:
        print(f"masked classes (< {cfg.min_class_fraction:.2%} of cells): {', '.join(res.data['masked_classes'])}")
    print(f"wrote {args.out}/predictions.tsv, cells.tsv and metrics.tsv")
    return 0


def register(subparsers) -> None:
    from ..cliargs import add_config_args, add_io_args
    from .config import AnnotatorConfig, ZeroshotConfig

    p = subparsers.add_parser(
        "train-annotator",
        help="zero-shot annotator: fine-tune a pretrained EpiAgent + classifier on a labelled atlas",
        description=(
            "Fine-tune a pretrained EpiAgent checkpoint with the authors' supervised classifier head "
            "(512-256-128-C MLP, focal loss) on labelled cells whose labels are coarsened with a label map "
            "(TSV source<TAB>target; unmapped cells are dropped). Writes OUT/checkpoint.pth in the "
            "authors' supervised format (+ .json config side file), classes.tsv, reference_ccres.npy (cCREs "
            "accessible in the training cells), train_log.tsv and "
            "metrics.tsv (held-out validation accuracy, micro/macro F1, balanced accuracy)."))
    add_io_args(p, checkpoint_help="pretrained EpiAgent checkpoint (.pth)")
    p.add_argument("--label-map", metavar="TSV",
                   help="label-map TSV coarsening the labels (resources/label_maps/)")
    add_config_args(p, AnnotatorConfig, group="settings")
    p.set_defaults(func=_train)

    q = subparsers.add_parser(
        "annotate-zeroshot",
        help="annotate new cells with a supervised (annotator) checkpoint, no training",
        description=(
            "Predict cell types with a supervised EpiAgent checkpoint (epiflow train-annotator, or the "
            "authors' EpiAgent-B / -NT with a classes.tsv). With --label-key the known labels (through "
            "--label-map) score the predictions: accuracy, micro F1, balanced accuracy, macro F1; classes "
            "predicted for fewer than --min-class-fraction of the cells are masked and scored as "
            "'<method>-masked'. Writes OUT/predictions.tsv, cells.tsv (labels, predictions and the UMAP of the "
            "annotator's cell embeddings; --no-umap: without it), metrics.tsv, confusion.png."))
    add_io_args(q, checkpoint_help="supervised checkpoint (.pth; epiflow train-annotator's checkpoint.pth)")
    g = q.add_argument_group("inputs besides the cells")
    g.add_argument("--classes", metavar="TSV", help="classes.tsv (index, label); default: beside the checkpoint")
    g.add_argument("--label-map", metavar="TSV",
                   help="label-map TSV mapping the known labels onto the classifier's classes")
    g.add_argument("--restrict-ccres", nargs="?", const="auto", metavar="NPY",
                   help="drop the cCREs the annotator never saw accessible in training (reference_ccres.npy "
                        "beside the checkpoint, or this .npy of cCRE indices): for references measured on a "
                        "smaller peak panel than the new data")
    add_config_args(q, ZeroshotConfig, group="settings")
    q.set_defaults(func=_annotate)


__all__ = ["register", "write_annotator", "write_annotation"]
