"""CLI verbs of the downstream tasks.

``epiflow evaluate-features``: clustering (Leiden bisected to the number of cell types; NMI, ARI),
UMAPs and optionally the PAGA / pseudotime trajectory, for EpiAgent embeddings (zero-shot, and
fine-tuned with CCA (K = 1) + SR when ``--finetune-epochs`` > 0) beside the LSI baseline.
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


def _evaluate_features(args: argparse.Namespace) -> int:
    from ..errors import EpiflowError
    from .features import evaluate_features, load_feature_inputs
    from ..metrics.table import metric_rows

    embeddings = _parse_embeddings(args.embeddings)
    if args.corpus is None and args.counts is None:
        raise EpiflowError("give --corpus (or --counts): the LSI baseline is computed from the cells' counts",
                           field="--corpus")
    if args.finetune_epochs < 0:
        raise EpiflowError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}", field="--finetune-epochs",
                           fix="0 = zero-shot only, N > 0 = also fine-tune N epochs with CCA + SR")
    if args.finetune_epochs > 0 and args.checkpoint is None:
        raise EpiflowError("--finetune-epochs needs the pretrained model", field="--checkpoint",
                           fix="pass --checkpoint checkpoint.pth (or --finetune-epochs 0)")
    if args.checkpoint is not None and args.corpus is None:
        raise EpiflowError("embedding cells with --checkpoint needs their tokenized sentences", field="--corpus",
                           fix="pass --corpus (the corpus folder) instead of --counts")
    drop = {"auto": "auto", "yes": True, "no": False}[args.lsi_drop_first]
    adata, methods, info, cells = load_feature_inputs(
        embeddings, corpus=args.corpus, counts_h5ad=args.counts, embedding_key=args.embedding_key,
        label_key=args.label_key, dataset=args.dataset, lsi_components=args.lsi_components,
        lsi_drop_first=drop, seed=args.seed, return_cells=True, lsi_recipe=args.lsi_recipe,
        own_features_h5ad=args.own_features)
    dataset = args.dataset
    if dataset is None:
        ds = adata.obs["dataset"].astype(str).unique() if "dataset" in adata.obs else []
        dataset = str(ds[0]) if len(ds) == 1 else "all"
    extra = metric_rows("feature_extraction", dataset, "LSI",
                        {"lsi_depth_spearman": info["depth_spearman"],
                         "lsi_dropped_first": int(info["dropped_first"])})
    if "own_features" in info:
        from .features import OWN_FEATURES_METHOD

        own = info["own_features"]
        extra += metric_rows("feature_extraction", dataset, OWN_FEATURES_METHOD,
                             {"n_features": own["n_features"], "lsi_depth_spearman": own["depth_spearman"],
                              "lsi_dropped_first": int(own["dropped_first"])})
    if args.checkpoint is not None:
        from .features_finetune import FINETUNED_METHOD, ZEROSHOT_METHOD, add_model_embeddings

        if args.finetune_epochs > 0 and FINETUNED_METHOD in methods:
            raise EpiflowError(f"method name {FINETUNED_METHOD!r} is reserved for --finetune-epochs",
                               field="--embeddings", fix="name the embeddings file otherwise")
        added, rows = add_model_embeddings(
            adata, cells, args.checkpoint, dataset=dataset, epochs=args.finetune_epochs,
            zero_shot_key="X_epiagent" if ZEROSHOT_METHOD in methods else None, lr=args.finetune_lr,
            batch_tokens=args.finetune_batch_tokens, max_len=args.max_len, seed=args.seed,
            num_heads=args.num_heads, device=args.device, backend=args.backend, progress=not args.no_progress,
            sr_objective=args.sr_objective)
        baselines = {m: methods.pop(m) for m in [k for k in methods if k.startswith("LSI")]}
        methods.update(added)
        methods.update(baselines)  # the LSI rows last
        extra = rows + extra
    table = evaluate_features(
        adata, label_key=args.label_key, embeddings=methods, out_dir=args.out_dir, dataset=dataset,
        n_neighbors=args.n_neighbors, seed=args.seed, max_iter=args.max_iter, umap=not args.no_umap,
        run_trajectory=args.trajectory, root_type=args.root_type, order=args.order, svg=args.svg,
        extra_rows=extra)
    show = table[table["metric"].isin(["NMI", "ARI", "leiden_reached", "spearman_types"])]
    print(show.pivot_table(index="method", columns="metric", values="value", sort=False).to_string())
    print(f"wrote {Path(args.out_dir) / 'metrics.tsv'}")
    return 0


def register(subparsers) -> None:
    from ..metrics.ordering import HEMATOPOIESIS_ORDER

    p = subparsers.add_parser(
        "evaluate-features",
        help="feature extraction: Leiden (bisected to #cell types) NMI/ARI, UMAPs, trajectory; EpiAgent vs LSI",
        description=(
            "Evaluate cell embeddings beside the LSI baseline (TF-IDF + truncated SVD on the same cells' "
            "counts): Leiden on the kNN graph with the resolution bisected until #clusters = #cell types, "
            "NMI and ARI against the labels, UMAP figures, and optionally PAGA + diffusion pseudotime "
            "compared with a known order of cell types. With --checkpoint the EpiAgent embeddings are computed "
            "here: zero-shot, and with --finetune-epochs N > 0 also after fine-tuning a copy of the model on the "
            "evaluated cells with CCA (K = 1) + SR (method EpiAgent-finetuned). Writes OUT_DIR/metrics.tsv (task, dataset, "
            "method, metric, value), cells.tsv, umap.png, umap_<method>.png[, trajectory.tsv, "
            "trajectory.png]. Cells with a missing label are excluded from the metrics."))
    p.add_argument("--embeddings", action="append", metavar="[NAME=]H5AD",
                   help="output of 'epiflow embed' (repeat for several models, e.g. zero-shot and fine-tuned; "
                        "the first is named EpiAgent unless NAME= is given)")
    p.add_argument("--embedding-key", default="X_epiagent", help="obsm key of the embedding (default X_epiagent)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--corpus", help="corpus folder the embedded cells come from (counts for LSI, labels); "
                                      "without --embeddings: evaluate LSI only on its cells")
    src.add_argument("--counts", help="h5ad of raw counts (cells matched on obs_names) instead of a corpus; "
                                      "without --embeddings: evaluate LSI only on its cells")
    p.add_argument("--label-key", default="cell_type", help="obs column with the cell types (default cell_type)")
    p.add_argument("--dataset", help="evaluate only the cells whose obs 'dataset' is NAME")
    p.add_argument("--lsi-components", type=int, default=50, help="SVD components of LSI (default 50)")
    p.add_argument("--lsi-drop-first", choices=["auto", "yes", "no"], default="auto",
                   help="drop the first LSI component: auto = when |Spearman(comp1, depth)| > 0.9")
    from ..baselines.lsi import DEFAULT_RECIPE, LSI_RECIPES

    p.add_argument("--lsi-recipe", choices=LSI_RECIPES, default=DEFAULT_RECIPE,
                   help=f"LSI TF-IDF + component scaling (default {DEFAULT_RECIPE}; log+us = the former default; "
                        "see epiflow.baselines.lsi)")
    p.add_argument("--own-features", metavar="H5AD",
                   help="the dataset's own cell x peak counts (X; cells matched on their barcode), e.g. the "
                        "published matrix a downstream dataset was mapped from: adds LSI on those features "
                        "(method LSI-own-features), the baseline that needs no shared vocabulary")
    p.add_argument("--n-neighbors", type=int, default=15, help="kNN graph size (default 15)")
    p.add_argument("--max-iter", type=int, default=30, help="most Leiden runs of the bisection (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trajectory", action="store_true",
                   help="also run PAGA + diffusion pseudotime and compare with --order")
    p.add_argument("--root-type", default="HSC", help="cell type of the pseudotime root (default HSC)")
    p.add_argument("--order", default=HEMATOPOIESIS_ORDER,
                   help=f"known order of the types, tiers separated by '<' (default '{HEMATOPOIESIS_ORDER}')")
    g = p.add_argument_group("EpiAgent model (zero-shot / fine-tuned embeddings computed here)")
    g.add_argument("--checkpoint",
                   help="pretrained model: embed the evaluated cells zero-shot (method EpiAgent) unless "
                        "--embeddings gives them, and with --finetune-epochs N > 0 also fine-tune a copy on "
                        "these cells with CCA (K = 1) + SR (method EpiAgent-finetuned); needs --corpus")
    g.add_argument("--finetune-epochs", type=int, default=0,
                   help="epochs of CCA + SR fine-tuning on the evaluated cells (default 0: zero-shot only)")
    g.add_argument("--finetune-lr", type=float, default=5e-4, help="fine-tuning learning rate (default 5e-4)")
    g.add_argument("--sr-objective", choices=["bce", "multinomial"], default="bce",
                   help="SR loss of the fine-tuning: bce (the paper, default) or multinomial (depth-invariant; "
                        "use the one the model was pretrained with)")
    g.add_argument("--finetune-batch-tokens", type=int, default=4096,
                   help="tokens per fine-tuning batch (default 4096)")
    g.add_argument("--max-len", type=int, help="tokens per cell (default: the model's rank limit - 2)")
    g.add_argument("--num-heads", type=int, help="attention heads (if the checkpoint has no side file)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--backend", default="auto", choices=["sdpa", "packed", "flash", "auto"],
                   help="attention backend (default auto: on CPU packed while fine-tuning, padded sdpa "
                        "for inference; on CUDA flash-attn if installed, else packed)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar while fine-tuning")
    p.add_argument("--no-umap", action="store_true", help="skip UMAPs and figures")
    p.add_argument("--svg", action="store_true", help="also write SVG figures")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.set_defaults(func=_evaluate_features)
