"""``epiflow simulate``: write the synthetic demo corpus (raw inputs in real formats + ground truth)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="write a synthetic scATAC corpus (manifest, h5ad/fragment datasets, cCRE sources, genes, GO, truth)",
        description="Write a seeded, deterministic synthetic scATAC-seq corpus: an atlas with several "
                    "cell types across batches, a 10x-style fragment dataset, a stimulation dataset, a "
                    "gene-knockout screen and a normal-vs-cancer pair, plus cCRE sources, genes, TSS, GO "
                    "annotations and the ground truth. See docs/simulate.md.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created atomically)")
    p.add_argument("--preset", default="demo", choices=["demo", "test"],
                   help="sizes: demo (~2,700 cells x 6,000 cCREs) or test (~440 cells x 1,500 cCREs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> byte-identical files)")
    p.add_argument("--n-cells", type=int, default=None, help="total cells (rescales every dataset)")
    p.add_argument("--n-ccres", type=int, default=None, help="number of true cCREs")
    p.add_argument("--n-genes", type=int, default=None, help="number of synthetic genes")
    p.add_argument("--downstream", default="",
                   help="comma-separated dataset names given the manifest role 'downstream' (evaluated, "
                        "never in the pretraining corpus); default: every dataset is 'corpus'")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import logging

    from .core import simulate_corpus

    paths = simulate_corpus(args.out, args.preset, seed=args.seed, overwrite=args.force,
                            n_cells=args.n_cells, n_ccres=args.n_ccres, n_genes=args.n_genes,
                            downstream=[d for d in args.downstream.split(",") if d.strip()])
    logging.getLogger("epiflow.simulate").info("wrote %s (manifest %s)", paths["out"], paths["manifest"])
    return 0
