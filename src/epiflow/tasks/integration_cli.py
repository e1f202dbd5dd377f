"""CLI verb ``epiflow integrate``: batch-conditioned fine-tuning with OT-matched partners, integration
metrics, UMAPs, and query mapping."""

from __future__ import annotations


def _integrate(args) -> int:
    from ..cliargs import config_from_args
    from ..plots.integration import integration_figures
    from ..report.results import write_task_result
    from .common import load_cells, load_inputs
    from .config import IntegrationConfig
    from .integration import run
    from .zeroshot import read_label_map

    cfg = config_from_args(IntegrationConfig, args)
    cells, model = load_inputs(args.corpus, args.checkpoint, cfg, df=args.df, dataset=args.dataset,
                               max_cells=cfg.max_cells)
    query = None if args.query is None else load_cells(args.query, df=args.df, dataset=args.query_dataset)
    label_map = None if args.label_map is None else read_label_map(args.label_map)
    res = run(cells, model, cfg, query=query, label_map=label_map, dataset=args.dataset)
    if cfg.umap:
        integration_figures(res, args.out)
    write_task_result(res, args.out, models=True)
    t = res.metrics
    show = t[(t["task"] == "integration") & t["metric"].isin(
        ["NMI", "ARI", "iLISI", "kBET", "kBET_global", "graph_connectivity", "batch_ASW"])]
    print(show.pivot_table(index="method", columns="metric", values="value", sort=False).to_string())
    q = t[(t["task"] == "query_mapping") & (t["metric"] == "accuracy")]
    if len(q):
        print(q[["method", "metric", "value"]].to_string(index=False))
    print(f"wrote {args.out}/metrics.tsv")
    return 0


def register(subparsers) -> None:
    from ..cliargs import CELLS_HELP, OneOrSeveral, add_config_args, add_io_args
    from .config import IntegrationConfig

    p = subparsers.add_parser(
        "integrate",
        help="batch integration: OT-matched partners, batch-token fine-tuning, NMI/ARI/kBET/iLISI, query mapping",
        description=(
            "Integrate the batches of a reference: zero-shot embeddings, exact OT (cosine) matching across each "
            "pair of batches, a 2-component GMM on matched distances keeps the lower-mean matches, fine-tuning "
            "with a batch token on SR + CCA targets from the cell and its kept partners; embeddings with and "
            "without the batch token (plus zero-shot and LSI) scored by NMI/ARI (Leiden bisected), kBET, iLISI, "
            "graph connectivity and batch ASW; UMAPs by batch and by cell type. With --query, query cells are "
            "embedded without a batch token and labelled by the majority of their --k-query nearest reference "
            "cells. Writes OUT/metrics.tsv, checkpoint.pth, batches.tsv, matches.tsv, embeddings.h5ad, "
            "umap_batch.png, umap_cell_type.png[, query_predictions.tsv]."))
    add_io_args(p, cells_help="reference cells: " + CELLS_HELP, several=True)
    g = p.add_argument_group("query and labels")
    g.add_argument("--query", metavar="PATH", nargs="+", action=OneOrSeveral,
                   help="query cells (same formats as --corpus; several paths are read together)")
    g.add_argument("--query-dataset", metavar="NAME[,NAME]",
                   help="use only the query cells whose obs 'dataset' is NAME (several: comma-separated)")
    g.add_argument("--label-map", metavar="TSV",
                   help="label-map TSV giving shared (coarse) labels (resources/label_maps/)")
    add_config_args(p, IntegrationConfig, group="settings")
    p.set_defaults(func=_integrate)
