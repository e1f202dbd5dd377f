"""CLI verbs of the perturbation tasks (SPEC §5).

* ``epiflow predict-stimulation`` - leave-one-cell-type-out stimulation prediction ([PER] token, OT pairs).
* ``epiflow predict-genetic`` - unseen genetic perturbations (gene tokens through the GO-graph GNN).
* ``epiflow make-perturbation-benchmark`` - semi-synthetic benchmarks from real cells, with truth.
* ``epiflow gene-graph`` - the GEARS-style GO Jaccard gene graph as an edge list.

The settings flags of ``predict-*`` are generated from :class:`~epiflow.tasks.config.StimulationConfig`
/ :class:`~epiflow.tasks.config.GeneticConfig`; the I/O flags are the standard ones
(:func:`epiflow.cliargs.add_io_args`). The task modules compute (:func:`epiflow.tasks.perturbation.run_stimulation`,
``run_genetic``); this module loads the inputs (:mod:`epiflow.tasks.common`) and writes the result
(:func:`write_result`, figures of :mod:`epiflow.plots.perturbation`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cliargs import add_config_args, add_io_args, config_from_args, fields
from .config import DEFAULT_KS, GeneticConfig, StimulationConfig

# the gene-graph settings of predict-genetic, also the flags of gene-graph
GRAPH_FIELDS = ("jaccard_threshold", "gene_neighbors", "gaf_aspect")


def _print(table, out_dir):
    show = table[~table["metric"].str.contains(r"\[", regex=True)]
    keys = [m for m in show["metric"].unique() if m.startswith(("R2_", "pearson", "dir_acc@", "wasserstein"))]
    show = show[show["metric"].isin(keys)]
    if len(show):
        print(show.pivot_table(index="method", columns="metric", values="value", sort=False,
                               aggfunc="mean").to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {Path(out_dir) / 'metrics.tsv'}")


def write_result(result, out, *, n_top: int = 1000, ks=DEFAULT_KS, svg: bool = False) -> list[Path]:
    """Write a perturbation task's result into ``out``: ``metrics.tsv``, ``finetune_loss.tsv``,
    ``split.tsv`` (genetic), ``predicted_cells.h5ad`` (when kept), ``mean_accessibility.tsv.gz``,
    ``scatter.png`` and ``direction.png``."""
    from ..io import atomic_path
    from ..plots.perturbation import perturbation_figures
    from ..report.results import write_task_result

    out = Path(out)
    written = write_task_result(result, out)
    means = result.data.get("mean_accessibility")
    if means is not None:
        with atomic_path(out / "mean_accessibility.tsv.gz") as tmp:
            means.to_csv(tmp, sep="\t", index=False, float_format="%.6g", compression="gzip")
        written.append(out / "mean_accessibility.tsv.gz")
    return written + perturbation_figures(result, out, n_top=n_top, ks=ks, svg=svg)


def _dataset(cells, key: str, args) -> str:
    """The metrics' dataset column: --dataset, else the one obs 'dataset' of the labelled cells, else
    the name of the input."""
    from .perturbation_train import _missing

    if args.dataset:
        return str(args.dataset)
    obs = cells.obs
    if "dataset" in obs and key in obs:
        ds = obs.loc[~_missing(obs[key]), "dataset"].astype(str).unique()
        if len(ds) == 1:
            return str(ds[0])
    p = Path(args.corpus)
    return p.name if p.is_dir() else p.stem


def _inputs(args, cfg, key: str):
    from .common import load_inputs

    cells, model = load_inputs(args.corpus, args.checkpoint, cfg, df=args.df, dataset=args.dataset)
    return cells, model, _dataset(cells, key, args)


def _predict_stimulation(args) -> int:
    from .perturbation import run_stimulation

    cfg = config_from_args(StimulationConfig, args)
    cells, model, dataset = _inputs(args, cfg, cfg.condition_key)
    result = run_stimulation(cells, model, cfg, dataset=dataset)
    write_result(result, args.out, n_top=cfg.n_top, ks=cfg.k, svg=cfg.svg)
    _print(result.metrics, args.out)
    return 0


def _predict_genetic(args) -> int:
    from ..genome.gene_graph import build_gene_graph
    from .perturbation import run_genetic

    cfg = config_from_args(GeneticConfig, args)
    cells, model, dataset = _inputs(args, cfg, cfg.perturbation_key)
    graph = build_gene_graph(args.go, threshold=cfg.jaccard_threshold, top_k=cfg.gene_neighbors,
                             aspect=cfg.gaf_aspect)
    result = run_genetic(cells, model, graph, cfg, dataset=dataset)
    write_result(result, args.out, n_top=cfg.n_top, ks=cfg.k, svg=cfg.svg)
    _print(result.metrics, args.out)
    return 0


def _make_benchmark(args) -> int:
    from .perturbation_benchmark import make_perturbation_benchmark

    info = make_perturbation_benchmark(args.corpus, args.tss, args.go, args.out, cell_type_key=args.label_key,
                                       seed=args.seed, n_genes=args.n_genes, window=args.window,
                                       write_corpora=not args.no_corpus, genome=args.genome)
    print(f"wrote {info['out']}: stimulation {info['stimulation_cells']} cells ({', '.join(info['cell_types'])}); "
          f"genetic {info['genetic_cells']} cells, knockouts {', '.join(info['knockouts'])}")
    return 0


def _gene_graph(args) -> int:
    from ..genome.gene_graph import build_gene_graph, write_gene_graph

    cfg = config_from_args(GeneticConfig, args)  # checks the bounds of the graph settings
    g = build_gene_graph(args.go, threshold=cfg.jaccard_threshold, top_k=cfg.gene_neighbors, aspect=cfg.gaf_aspect)
    write_gene_graph(g, args.out)
    print(f"wrote {args.out}: {g.n_genes} genes, {g.n_edges} edges")
    return 0


def _graph_args(p: argparse.ArgumentParser) -> None:
    """The gene-graph settings of :class:`~epiflow.tasks.config.GeneticConfig` as flags."""
    add_config_args(p, GeneticConfig, exclude=[f.name for f, _ in fields(GeneticConfig) if f.name not in GRAPH_FIELDS],
                    group="gene graph")


CELLS_HELP = ("cells: a corpus folder (obs label columns; epiflow build-corpus / tokenize-downstream), a shard "
              ".h5, or an .h5ad of raw counts over the model's cCREs (with --df or var['df'])")
CHECKPOINT_HELP = "pretrained EpiAgent checkpoint (with signal decoder + CCA head)"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict-stimulation", help="stimulated perturbation: [PER] token, OT pairs, leave-one-cell-type-out",
        description=("Fine-tune EpiAgent with a learnable [PER] token on OT-matched (unperturbed -> perturbed) "
                     "pairs of all but one cell type and predict that type's perturbed cells from its "
                     "unperturbed cells; in turn for every cell type. Compares with 'no change' and 'mean "
                     "shift of the other types'. Writes metrics.tsv (R2 all / top-n DA, direction accuracy "
                     "at k, Wasserstein), mean_accessibility.tsv.gz, predicted_cells.h5ad, scatter.png, "
                     "direction.png."))
    add_io_args(p, cells_help=CELLS_HELP, checkpoint_help=CHECKPOINT_HELP)
    add_config_args(p, StimulationConfig)
    p.set_defaults(func=_predict_stimulation)

    p = subparsers.add_parser(
        "predict-genetic", help="unseen genetic perturbation: gene tokens through a GO-graph GNN",
        description=("Fine-tune EpiAgent with gene tokens passed through the GNN over the GEARS-style GO "
                     "Jaccard gene graph on 75%% of the perturbations; predict the held-out 25%% from the "
                     "control cells. Writes metrics.tsv (Pearson of mean accessibility over top-n DA, "
                     "direction accuracy), split.tsv, predictions and figures."))
    add_io_args(p, cells_help=CELLS_HELP, checkpoint_help=CHECKPOINT_HELP)
    p.add_argument("--go", required=True, help="GO annotations: TSV gene_symbol<TAB>go_id (e.g. go.tsv) or GAF")
    add_config_args(p, GeneticConfig)
    p.set_defaults(func=_predict_genetic)

    p = subparsers.add_parser(
        "make-perturbation-benchmark", help="semi-synthetic stimulation + knockout benchmarks from real cells",
        description=("Apply a known stimulation program (shared + cell-type-specific opening, shared closing) "
                     "and GO-aware gene knockouts (close cCREs near the gene's TSS and, more weakly, near its "
                     "GO neighbours') to real cells. Writes stimulation.h5ad, genetic.h5ad, corpus folders, "
                     "truth/ and README.md (the generative rule)."))
    add_io_args(p, checkpoint=None, df=False, dataset=False,
                cells_help="h5ad of raw counts (cells x peaks, obs cell type)")
    p.add_argument("--tss", required=True, help="TSS BED of the same genome build as the peaks")
    p.add_argument("--go", required=True, help="GO annotations (TSV gene_symbol, go_id or GAF)")
    p.add_argument("--label-key", "--cell-type-key", dest="label_key", default="cell_type",
                   help="obs column of the cell types (as on every verb; --cell-type-key: its former name)")
    p.add_argument("--n-genes", type=int, default=12, help="knocked-out genes (default 12)")
    p.add_argument("--window", type=int, default=10_000, help="peak centre to TSS distance, bp (default 10000)")
    p.add_argument("--genome", help="genome build stored with the outputs (default: the input's uns['genome'])")
    p.add_argument("--no-corpus", action="store_true", help="do not write the corpus folders")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_benchmark)

    p = subparsers.add_parser("gene-graph", help="GEARS-style gene graph (GO Jaccard > 0.1, top 20) as TSV",
                              description="Write the gene graph edge list (gene, neighbour, jaccard).")
    p.add_argument("--go", required=True, help="GO annotations (TSV gene_symbol, go_id or GAF)")
    _graph_args(p)
    add_io_args(p, cells=None, checkpoint=None, out="file")
    p.set_defaults(func=_gene_graph)
