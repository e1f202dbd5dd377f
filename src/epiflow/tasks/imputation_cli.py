"""``epiflow impute``: fine-tune with CCA (K = 1) + MSE signal reconstruction of TF-IDF, impute every cell
from the signal decoder, evaluate beside the raw data and an LSI reconstruction.

The flags of the settings are generated from :class:`epiflow.tasks.config.ImputationConfig`; the I/O
flags are the common ones (:func:`epiflow.cliargs.add_io_args`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cliargs import add_config_args, add_io_args, config_from_args
from .config import ImputationConfig


def _impute(args: argparse.Namespace) -> int:
    from ..report.results import write_task_result
    from .common import corpus_vocab, load_inputs
    from .imputation import run

    cfg = config_from_args(ImputationConfig, args)
    cells, model = load_inputs(args.corpus, args.checkpoint, cfg, df=args.df, dataset=args.dataset)
    res = run(cells, model, cfg, vocab=corpus_vocab(args.corpus), dataset=args.dataset)
    out = Path(args.out)
    write_task_result(res, out, models=cfg.save_model)
    if cfg.figures:
        from ..plots.imputation import imputation_figures

        imputation_figures(res, out, svg=cfg.svg)
    metrics = res.metrics
    show = metrics[metrics["metric"].isin(["NMI", "ARI", "pearson_cell_median", "pearson_ccre_median",
                                           "mse_cell_median"])]
    print(show.pivot_table(index="method", columns="metric", values="value", sort=False).to_string())
    adata = res.h5ad["imputed"]
    print(f"imputed {adata.n_obs} cells x {adata.n_vars} cCREs; wrote {out / 'metrics.tsv'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "impute",
        help="imputation: fine-tune with CCA + MSE signal reconstruction, impute from the decoder; vs raw / LSI",
        description=(
            "Fine-tune the pretrained model on all cells with CCA (K = 1) + signal reconstruction as an MSE "
            "regression of the TF-IDF values, impute every cell from the signal decoder, and evaluate on the "
            "cCREs open in >= 3 % of the cells: PCA + Leiden (bisected to the number of cell types) NMI/ARI, "
            "Pearson r and MSE against the per-cell-type mean TF-IDF per cell and per cCRE, for the imputed "
            "matrix, the raw TF-IDF and a truncated-SVD (LSI) reconstruction. Writes OUT/metrics.tsv (task, "
            "dataset, method, metric, value), imputed.h5ad, per_cell.tsv, per_ccre.tsv, train_log.tsv, "
            "imputation_box.png [, finetuned.pth]."))
    add_io_args(p)
    add_config_args(p, ImputationConfig, group="settings")
    p.set_defaults(func=_impute)
