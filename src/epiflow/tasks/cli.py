"""CLI verbs of the downstream tasks.

``epiflow evaluate-features``: clustering (Leiden bisected to the number of cell types; NMI, ARI),
UMAPs and optionally the PAGA / pseudotime trajectory, for EpiAgent embeddings (zero-shot, and
fine-tuned with CCA (K = 1) + SR when ``--epochs`` > 0) beside the LSI baseline. The flags are generated
from :class:`epiflow.tasks.config.FeaturesConfig` (plus the I/O flags of :func:`epiflow.cliargs.add_io_args`
and the input files ``--embeddings``, ``--counts``, ``--own-features``); :func:`epiflow.tasks.features.run`
computes, :func:`write_features` writes the files and figures.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _parse_embeddings(items: list[str] | None) -> dict[str, str]:
    from ..errors import EpiflowError

    out: dict[str, str] = {}
    for i, item in enumerate(items or []):
        if "=" in item and not Path(item).exists():
            name, path = item.split("=", 1)
        else:
            name, path = ("EpiAgent" if i == 0 else Path(item).stem), item
        name = name.strip()
        if not name or name in out or name == "LSI":
            raise EpiflowError(f"method name {name!r} is empty, repeated or reserved (LSI)",
                               field="--embeddings", fix="write --embeddings NAME=PATH with distinct names")
        out[name] = path
    return out


def write_features(result, out, cfg) -> None:
    """The files of ``epiflow evaluate-features`` in ``out``: the figures (``cfg.umap``; SVG too with
    ``cfg.svg``), ``cells.tsv``, ``trajectory.tsv`` and ``paga.tsv`` (with the trajectory) and ``metrics.tsv``."""
    from ..report.results import write_task_result

    if cfg.umap:
        from ..plots.features import feature_figures

        feature_figures(result, out, svg=cfg.svg)
    write_task_result(result, out)
    log.info("wrote %s", Path(out) / "metrics.tsv")


def _evaluate_features(args: argparse.Namespace) -> int:
    from ..cliargs import config_from_args
    from ..errors import EpiflowError
    from .config import FeaturesConfig
    from .features import load_feature_inputs, run

    cfg = config_from_args(FeaturesConfig, args)
    embeddings = _parse_embeddings(args.embeddings)
    if args.corpus is not None and args.counts is not None:
        raise EpiflowError("give either --corpus or --counts, not both", field="--counts",
                           fix="--corpus for a corpus folder, --counts for an h5ad of raw counts")
    if args.corpus is None and args.counts is None:
        raise EpiflowError("give --corpus (or --counts): the LSI baseline is computed from the cells' counts",
                           field="--corpus")
    if cfg.epochs > 0 and args.checkpoint is None:
        raise EpiflowError("--epochs needs the pretrained model", field="--checkpoint",
                           fix="pass --checkpoint checkpoint.pth (or --epochs 0)")
    if args.checkpoint is not None and args.corpus is None:
        raise EpiflowError("embedding cells with --checkpoint needs their tokenized sentences", field="--corpus",
                           fix="pass --corpus (the corpus folder) instead of --counts")
    drop = {"auto": "auto", "yes": True, "no": False}[cfg.lsi_drop_first]
    adata, methods, info, cells = load_feature_inputs(
        embeddings, corpus=args.corpus, counts_h5ad=args.counts, embedding_key=cfg.embedding_key,
        label_key=cfg.label_key, dataset=args.dataset, lsi_components=cfg.lsi_components,
        lsi_drop_first=drop, seed=cfg.seed, return_cells=True, lsi_recipe=cfg.lsi_recipe,
        own_features_h5ad=args.own_features)
    model = None
    if args.checkpoint is not None:
        from .common import load_model

        # on the CPU: fine-tuning trains a copy on cfg.device (epiflow.tasks.features_finetune)
        model = load_model(args.checkpoint, n_ccres=cells.n_ccres, vocab_id=cells.vocab_id, num_heads=cfg.num_heads, backend=cfg.backend)
    result = run(adata, cfg, embeddings=methods, dataset=args.dataset, model=model, cells=cells, lsi_info=info)
    write_features(result, args.out, cfg)
    table = result.metrics
    show = table[table["metric"].isin(["NMI", "ARI", "leiden_reached", "spearman_types"])]
    print(show.pivot_table(index="method", columns="metric", values="value", sort=False).to_string())
    print(f"wrote {Path(args.out) / 'metrics.tsv'}")
    return 0


def register(subparsers) -> None:
    from ..cliargs import add_config_args, add_io_args
    from .config import FeaturesConfig

    p = subparsers.add_parser(
        "evaluate-features",
        help="feature extraction: Leiden (bisected to #cell types) NMI/ARI, UMAPs, trajectory; EpiAgent vs LSI",
        description=(
            "Evaluate cell embeddings beside the LSI baseline (TF-IDF + truncated SVD on the same cells' "
            "counts): Leiden on the kNN graph with the resolution bisected until #clusters = #cell types, "
            "NMI and ARI against the labels, UMAP figures, and optionally PAGA + diffusion pseudotime "
            "compared with a known order of cell types. With --checkpoint the EpiAgent embeddings are computed "
            "here: zero-shot, and with --epochs N > 0 also after fine-tuning a copy of the model on the "
            "evaluated cells with CCA (K = 1) + SR (method EpiAgent-finetuned). Writes OUT/metrics.tsv (task, "
            "dataset, method, metric, value), cells.tsv, umap.png, umap_<method>.png[, trajectory.tsv, "
            "paga.tsv, trajectory.png]. Cells with a missing label are excluded from the metrics."))
    add_io_args(p, cells="optional", checkpoint="optional", df=False,
                cells_help="corpus folder the embedded cells come from (counts for LSI, labels; sentences for "
                           "--checkpoint); without --embeddings: evaluate LSI only on its cells",
                checkpoint_help="pretrained model: embed the evaluated cells zero-shot (method EpiAgent) unless "
                                "--embeddings gives them, and with --epochs N > 0 also fine-tune a copy on "
                                "these cells with CCA (K = 1) + SR (method EpiAgent-finetuned); needs --corpus")
    g = p.add_argument_group("inputs besides the cells")
    g.add_argument("--embeddings", action="append", metavar="[NAME=]H5AD",
                   help="output of 'epiflow embed' (repeat for several models, e.g. zero-shot and fine-tuned; "
                        "the first is named EpiAgent unless NAME= is given)")
    g.add_argument("--counts", metavar="H5AD",
                   help="h5ad of raw counts (cells matched on obs_names) instead of --corpus; without "
                        "--embeddings: evaluate LSI only on its cells")
    g.add_argument("--own-features", metavar="H5AD",
                   help="the dataset's own cell x peak counts (X; cells matched on their barcode), e.g. the "
                        "published matrix a downstream dataset was mapped from: adds LSI on those features "
                        "(method LSI-own-features), the baseline that needs no shared vocabulary")
    add_config_args(p, FeaturesConfig, group="settings")
    p.set_defaults(func=_evaluate_features)
