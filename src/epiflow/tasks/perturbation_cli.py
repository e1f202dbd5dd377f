"""CLI verbs of the perturbation tasks (SPEC §5).

* ``epiflow predict-stimulation`` - leave-one-cell-type-out stimulation prediction ([PER] token, OT pairs).
* ``epiflow predict-genetic`` - unseen genetic perturbations (gene tokens through the GO-graph GNN).
* ``epiflow make-perturbation-benchmark`` - semi-synthetic benchmarks from real cells, with truth.
* ``epiflow gene-graph`` - the GEARS-style GO Jaccard gene graph as an edge list.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError("--k needs positive integers")
    return ks


def _settings(args):
    from .perturbation_train import FinetuneSettings

    return FinetuneSettings(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                            new_lr=args.new_lr, aux_weight=args.aux_weight, cca_k=args.cca_k, max_len=args.max_len,
                            seed=args.seed, device=args.device, progress=not args.no_progress)


def _print(table, out_dir):
    import numpy as np

    show = table[~table["metric"].str.contains(r"\[", regex=True)]
    keys = [m for m in show["metric"].unique() if m.startswith(("R2_", "pearson", "dir_acc@", "wasserstein"))]
    show = show[show["metric"].isin(keys)]
    if len(show):
        print(show.pivot_table(index="method", columns="metric", values="value", sort=False,
                               aggfunc=np.mean).to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {Path(out_dir) / 'metrics.tsv'}")


def _predict_stimulation(args) -> int:
    from .perturbation import load_task_inputs, predict_stimulation

    cells, model, dataset = load_task_inputs(args.corpus, args.condition_key, args.checkpoint,
                                             dataset=args.dataset, num_heads=args.num_heads)
    table = predict_stimulation(cells, model, condition_key=args.condition_key, control=args.control,
                                cell_type_key=args.cell_type_key, holdout=args.holdout, out_dir=args.out_dir,
                                dataset=dataset, settings=_settings(args), ks=args.k, n_top=args.n_top,
                                min_cells=args.min_cells, save_cells=not args.no_save_cells, svg=args.svg,
                                seed=args.seed)
    _print(table, args.out_dir)
    return 0


def _predict_genetic(args) -> int:
    from ..genome.gene_graph import build_gene_graph
    from .perturbation import load_task_inputs, predict_genetic

    cells, model, dataset = load_task_inputs(args.corpus, args.perturbation_key, args.checkpoint,
                                             dataset=args.dataset, num_heads=args.num_heads)
    graph = build_gene_graph(args.go, threshold=args.jaccard_threshold, top_k=args.top_neighbours,
                             aspect=args.gaf_aspect)
    table = predict_genetic(cells, model, graph, perturbation_key=args.perturbation_key, control=args.control,
                            holdout=args.holdout, holdout_fraction=args.holdout_fraction, out_dir=args.out_dir,
                            dataset=dataset, settings=_settings(args), ks=args.k, n_top=args.n_top,
                            min_cells=args.min_cells, save_cells=not args.no_save_cells, svg=args.svg,
                            seed=args.seed)
    _print(table, args.out_dir)
    return 0


def _make_benchmark(args) -> int:
    from .perturbation_benchmark import make_perturbation_benchmark

    info = make_perturbation_benchmark(args.input, args.tss, args.go, args.out, cell_type_key=args.cell_type_key,
                                       seed=args.seed, n_genes=args.n_genes, window=args.window,
                                       write_corpora=not args.no_corpus, genome=args.genome)
    print(f"wrote {info['out']}: stimulation {info['stimulation_cells']} cells ({', '.join(info['cell_types'])}); "
          f"genetic {info['genetic_cells']} cells, knockouts {', '.join(info['knockouts'])}")
    return 0


def _gene_graph(args) -> int:
    from ..genome.gene_graph import build_gene_graph, write_gene_graph

    g = build_gene_graph(args.go, threshold=args.jaccard_threshold, top_k=args.top_neighbours, aspect=args.gaf_aspect)
    write_gene_graph(g, args.out)
    print(f"wrote {args.out}: {g.n_genes} genes, {g.n_edges} edges")
    return 0


def _common(p: argparse.ArgumentParser, key: str, key_help: str) -> None:
    p.add_argument("--corpus", required=True, help="corpus folder holding the cells (obs label columns)")
    p.add_argument("--checkpoint", required=True, help="pretrained EpiAgent checkpoint (with signal decoder + CCA head)")
    p.add_argument("--num-heads", type=int, help="attention heads (if no <checkpoint>.json side file; 512-wide: 8)")
    p.add_argument(f"--{key}-key", default=key, help=key_help)
    p.add_argument("--control", default="control", help="label of the unperturbed cells (default control)")
    p.add_argument("--dataset", help="use only the cells whose obs 'dataset' is NAME")
    p.add_argument("--holdout", action="append", help="held-out group (repeatable; default: see above)")
    p.add_argument("--k", type=_ks, default=(100, 250, 500, 1000),
                   help="top-k DA cCREs for direction accuracy (comma list; capped at what is available)")
    p.add_argument("--n-top", type=int, default=1000, help="top-n DA cCREs for R2 / Pearson / Wasserstein (default 1000)")
    p.add_argument("--min-cells", type=int, default=3, help="fewest cells per group (default 3)")
    ft = p.add_argument_group("fine-tuning")
    ft.add_argument("--epochs", type=int, default=3, help="passes over the training examples (default 3)")
    ft.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (tests / quick runs)")
    ft.add_argument("--batch-size", type=int, default=16)
    ft.add_argument("--lr", type=float, default=1e-4,
                    help="learning rate of the pretrained weights (default 1e-4, for the paper-size model; the "
                         "tiny demo model needs ~1e-3 for the [PER] token to take effect)")
    ft.add_argument("--new-lr", type=float, default=1e-3, help="learning rate of the new token / GNN / classifier")
    ft.add_argument("--aux-weight", type=float, default=0.01, help="weight of the auxiliary classifier (0.01)")
    ft.add_argument("--cca-k", type=int, default=1, help="CCA negatives per positive (1)")
    ft.add_argument("--max-len", type=int, help="tokens per cell (default: the model's rank embeddings - 2)")
    ft.add_argument("--device", default="auto",
                    help="auto (CUDA when available, else CPU; default), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save-cells", action="store_true", help="do not write predicted_cells.h5ad")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--svg", action="store_true", help="also write SVG figures")
    p.add_argument("--out-dir", required=True, help="output folder (metrics.tsv, predictions, figures)")


def _graph_args(p):
    p.add_argument("--jaccard-threshold", type=float, default=0.1, help="keep edges with Jaccard > this (0.1)")
    p.add_argument("--top-neighbours", type=int, default=20, help="neighbours per gene (20)")
    p.add_argument("--gaf-aspect", default="P", help="GAF files: GO aspect to keep (P = biological process)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict-stimulation", help="stimulated perturbation: [PER] token, OT pairs, leave-one-cell-type-out",
        description=("Fine-tune EpiAgent with a learnable [PER] token on OT-matched (unperturbed -> perturbed) "
                     "pairs of all but one cell type and predict that type's perturbed cells from its "
                     "unperturbed cells; in turn for every cell type. Compares with 'no change' and 'mean "
                     "shift of the other types'. Writes metrics.tsv (R2 all / top-n DA, direction accuracy "
                     "at k, Wasserstein), mean_accessibility.tsv.gz, predicted_cells.h5ad, scatter.png, "
                     "direction.png."))
    _common(p, "condition", "obs column of the condition (default condition)")
    p.add_argument("--cell-type-key", default="cell_type", help="obs column of the cell types (default cell_type)")
    p.set_defaults(func=_predict_stimulation)

    p = subparsers.add_parser(
        "predict-genetic", help="unseen genetic perturbation: gene tokens through a GO-graph GNN",
        description=("Fine-tune EpiAgent with gene tokens passed through the GNN over the GEARS-style GO "
                     "Jaccard gene graph on 75%% of the perturbations; predict the held-out 25%% from the "
                     "control cells. Writes metrics.tsv (Pearson of mean accessibility over top-n DA, "
                     "direction accuracy), split.tsv, predictions and figures."))
    _common(p, "perturbation", "obs column of the perturbation (control label or gene symbols joined by '+')")
    p.add_argument("--go", required=True, help="GO annotations: TSV gene_symbol<TAB>go_id (e.g. go.tsv) or GAF")
    p.add_argument("--holdout-fraction", type=float, default=0.25, help="fraction of perturbations held out (0.25)")
    _graph_args(p)
    p.set_defaults(func=_predict_genetic)

    p = subparsers.add_parser(
        "make-perturbation-benchmark", help="semi-synthetic stimulation + knockout benchmarks from real cells",
        description=("Apply a known stimulation program (shared + cell-type-specific opening, shared closing) "
                     "and GO-aware gene knockouts (close cCREs near the gene's TSS and, more weakly, near its "
                     "GO neighbours') to real cells. Writes stimulation.h5ad, genetic.h5ad, corpus folders, "
                     "truth/ and README.md (the generative rule)."))
    p.add_argument("--input", required=True, help="h5ad of raw counts (cells x peaks, obs cell type)")
    p.add_argument("--tss", required=True, help="TSS BED of the same genome build as the peaks")
    p.add_argument("--go", required=True, help="GO annotations (TSV gene_symbol, go_id or GAF)")
    p.add_argument("--cell-type-key", default="cell_type")
    p.add_argument("--n-genes", type=int, default=12, help="knocked-out genes (default 12)")
    p.add_argument("--window", type=int, default=10_000, help="peak centre to TSS distance, bp (default 10000)")
    p.add_argument("--genome", help="genome build stored with the outputs (default: the input's uns['genome'])")
    p.add_argument("--no-corpus", action="store_true", help="do not write the corpus folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_make_benchmark)

    p = subparsers.add_parser("gene-graph", help="GEARS-style gene graph (GO Jaccard > 0.1, top 20) as TSV",
                              description="Write the gene graph edge list (gene, neighbour, jaccard).")
    p.add_argument("--go", required=True, help="GO annotations (TSV gene_symbol, go_id or GAF)")
    _graph_args(p)
    p.add_argument("--out", required=True, help="output TSV")
    p.set_defaults(func=_gene_graph)
