"""``epiflow impute``: fine-tune with CCA (K = 1) + MSE signal reconstruction of TF-IDF, impute every cell
from the signal decoder, evaluate beside the raw data and an LSI reconstruction."""

from __future__ import annotations

import argparse
from pathlib import Path


def _impute(args: argparse.Namespace) -> int:
    from .imputation import impute

    adata, metrics = impute(
        args.corpus, args.checkpoint, args.label_key, epochs=args.epochs, lr=args.lr, head_lr=args.head_lr,
        batch_size=args.batch_size, max_len=args.max_len, seed=args.seed, out_dir=args.out_dir,
        dataset=args.dataset, max_steps=args.max_steps, min_cell_fraction=args.min_cell_fraction,
        cca_weight=args.cca_weight, sr_weight=args.sr_weight, cca_max_pos=args.cca_max_pos,
        lsi_components=args.lsi_components, n_pcs=args.n_pcs, num_heads=args.num_heads, device=args.device,
        backend=args.backend, save_model=args.save_model, figures=not args.no_figures, svg=args.svg,
        trainer=args.trainer)
    show = metrics[metrics["metric"].isin(["NMI", "ARI", "pearson_cell_median", "pearson_ccre_median",
                                           "mse_cell_median"])]
    print(show.pivot_table(index="method", columns="metric", values="value", sort=False).to_string())
    print(f"imputed {adata.n_obs} cells x {adata.n_vars} cCREs; wrote {Path(args.out_dir) / 'metrics.tsv'}")
    return 0


def register(subparsers) -> None:
    from .annotation_cli import add_common_finetune_args

    p = subparsers.add_parser(
        "impute",
        help="imputation: fine-tune with CCA + MSE signal reconstruction, impute from the decoder; vs raw / LSI",
        description=(
            "Fine-tune the pretrained model on all cells with CCA (K = 1) + signal reconstruction as an MSE "
            "regression of the TF-IDF values, impute every cell from the signal decoder, and evaluate on the "
            "cCREs open in >= 3%% of the cells: PCA + Leiden (bisected to the number of cell types) NMI/ARI, "
            "Pearson r and MSE against the per-cell-type mean TF-IDF per cell and per cCRE, for the imputed "
            "matrix, the raw TF-IDF and a truncated-SVD (LSI) reconstruction. Writes OUT_DIR/metrics.tsv (task, "
            "dataset, method, metric, value), imputed.h5ad, per_cell.tsv, per_ccre.tsv, train_log.tsv, "
            "imputation_box.png [, finetuned.pth]."))
    add_common_finetune_args(p, epochs=15, lr=5e-4, batch_size=16)
    p.add_argument("--head-lr", type=float, help="learning rate of the signal decoder and CCA head "
                                                 "(default 10 x --lr)")
    p.add_argument("--min-cell-fraction", type=float, default=0.03,
                   help="evaluate the cCREs open in at least this fraction of cells (default 0.03)")
    p.add_argument("--cca-weight", type=float, default=1.0, help="weight of the CCA loss (default 1)")
    p.add_argument("--sr-weight", type=float, default=1.0, help="weight of the MSE reconstruction (default 1)")
    p.add_argument("--cca-max-pos", type=int, help="cap on CCA positives per cell (default: all, as the paper)")
    p.add_argument("--n-pcs", type=int, default=50, help="principal components before Leiden (default 50)")
    p.add_argument("--save-model", action="store_true", help="also write the fine-tuned model (finetuned.pth)")
    p.set_defaults(func=_impute)
