"""CLI verb ``epiflow integrate``: batch-conditioned fine-tuning with OT-matched partners, integration
metrics, UMAPs, and query mapping."""

from __future__ import annotations


def _integrate(args) -> int:
    from .integration import integrate
    from .common import load_cells

    cells = load_cells(args.input, df=args.df, dataset=args.dataset, max_cells=args.max_cells, seed=args.seed)
    query = None if args.query is None else load_cells(args.query, df=args.df, dataset=args.query_dataset)
    res = integrate(args.checkpoint, cells, out_dir=args.out_dir, batch_key=args.batch_key,
                    label_key=args.label_key, label_map=args.label_map, query=query,
                    query_label_key=args.query_label_key, num_heads=args.num_heads, max_steps=args.max_steps,
                    batch_size=args.batch_size, lr=args.lr, max_len=args.max_len, max_ot_cells=args.max_ot_cells,
                    k_query=args.k_query, lsi=not args.no_lsi, umap=not args.no_umap,
                    common_ccres=args.common_ccres, seed=args.seed,
                    device=args.device, dataset=args.dataset)
    t = res["metrics"]
    show = t[(t["task"] == "integration") & t["metric"].isin(
        ["NMI", "ARI", "iLISI", "kBET", "kBET_per_label", "graph_connectivity", "batch_ASW"])]
    print(show.pivot_table(index="method", columns="metric", values="value", sort=False).to_string())
    q = t[(t["task"] == "query_mapping") & (t["metric"] == "accuracy")]
    if len(q):
        print(q[["method", "metric", "value"]].to_string(index=False))
    print(f"wrote {args.out_dir}/metrics.tsv")
    return 0


def register(subparsers) -> None:
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
            "cells. Writes OUT_DIR/metrics.tsv, checkpoint.pth, batches.tsv, matches.tsv, embeddings.h5ad, "
            "umap_batch.png, umap_cell_type.png[, query_predictions.tsv]."))
    p.add_argument("--checkpoint", required=True, help="pretrained EpiAgent checkpoint (.pth)")
    p.add_argument("--input", required=True, help="reference cells: corpus folder, shard .h5 or .h5ad of counts")
    p.add_argument("--df", help="df.npy of the model's corpus (for .h5ad inputs without var['df'])")
    p.add_argument("--dataset", help="use only the reference cells whose obs 'dataset' is NAME (several: comma-separated)")
    p.add_argument("--batch-key", default="batch",
                   help="obs column with the batches (default batch; e.g. donor, or dataset for two studies)")
    p.add_argument("--label-key", default="cell_type", help="obs column with the cell types (default cell_type)")
    p.add_argument("--label-map", help="label-map TSV giving shared (coarse) labels (resources/label_maps/)")
    p.add_argument("--query", help="query cells (same formats as --input)")
    p.add_argument("--query-dataset", help="use only the query cells whose obs 'dataset' is NAME")
    p.add_argument("--query-label-key", help="obs column with the query's known labels (default: --label-key)")
    p.add_argument("--k-query", type=int, default=20, help="reference neighbours voting per query cell (default 20)")
    p.add_argument("--num-heads", type=int, help="attention heads (if the checkpoint has no side file)")
    p.add_argument("--max-steps", type=int, default=200, help="fine-tuning steps (default 200)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-len", type=int, default=2048, help="tokens per cell in training (default 2048)")
    p.add_argument("--max-ot-cells", type=int, default=5000, help="largest OT problem side (default 5000)")
    p.add_argument("--max-cells", type=int, help="use a random subset of N reference cells")
    p.add_argument("--common-ccres", action="store_true",
                   help="keep only the cCREs accessible in every batch (and restrict the query to them): for "
                        "batches measured on different peak panels")
    p.add_argument("--no-lsi", action="store_true", help="skip the LSI baseline")
    p.add_argument("--no-umap", action="store_true", help="skip UMAPs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.set_defaults(func=_integrate)
