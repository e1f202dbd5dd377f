"""CLI verb ``epiflow knockout``: in-silico cCRE knockout between two cell states."""

from __future__ import annotations


def _knockout(args) -> int:
    from ..errors import EpiflowError
    from .knockout import run_knockout
    from .common import load_cells

    targets = None
    if args.ccres:
        try:
            targets = [int(x) for x in args.ccres.split(",") if x.strip()]
        except ValueError:
            raise EpiflowError(f"--ccres must be comma-separated cCRE indices, got {args.ccres!r}",
                               field="--ccres") from None
    genes = [g for g in args.genes.split(",") if g.strip()] if args.genes else None
    cells = args.input if args.df is None and args.dataset is None else load_cells(
        args.input, df=args.df, dataset=args.dataset)
    res = run_knockout(args.checkpoint, cells, out_dir=args.out_dir, state_key=args.state_key,
                       state_a=args.state_a, state_b=args.state_b, genes=genes, tss=args.tss, targets=targets,
                       vocab=args.vocab, upstream=args.upstream, downstream=args.downstream,
                       num_heads=args.num_heads, finetune_steps=args.finetune_steps, batch_size=args.batch_size,
                       lr=args.lr, n_reference=args.n_reference, n_query=args.n_query, n_random=args.n_random,
                       k=args.k, alternative=args.alternative, seed=args.seed, device=args.device,
                       figures=not args.no_figures)
    print(res["table"].to_string(index=False))
    print(f"random knockouts: mean effect {res['random_effects'].mean():.4g}; reference score r = {res['score_r']:.3f}")
    print(f"wrote {args.out_dir}/knockout.tsv and metrics.tsv")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "knockout",
        help="in-silico cCRE knockout between two states (chimeric cells, 20-NN score change, t-test vs random)",
        description=(
            "OT-pair cells of two states (e.g. normal vs cancer), build chimeric reference cells with a score "
            "drawn uniformly in [0, 1] (fraction of cCREs from state B) and query chimeras at 0.5 with each "
            "target cCRE added then removed; the effect is the change of the mean score of the 20 nearest "
            "reference cells, tested one-sided (Welch t) against knockouts of random cCREs. Targets: --ccres "
            "(vocabulary indices) or --genes with --tss (BED6 TSS file or GTF; promoter windows). Writes "
            "OUT_DIR/knockout.tsv, random.tsv, knockout_umap.png, knockout_effects.png, metrics.tsv."))
    p.add_argument("--checkpoint", required=True, help="pretrained EpiAgent checkpoint (.pth)")
    p.add_argument("--input", required=True, help="cells of both states: corpus folder, shard .h5 or .h5ad")
    p.add_argument("--df", help="df.npy of the model's corpus (for .h5ad inputs without var['df'])")
    p.add_argument("--dataset", help="use only the cells whose obs 'dataset' is NAME (several: comma-separated)")
    p.add_argument("--state-key", default="state", help="obs column with the states (default state)")
    p.add_argument("--state-a", default="normal", help="the reference state, score 0 (default normal)")
    p.add_argument("--state-b", default="cancer", help="the other state, score 1 (default cancer)")
    p.add_argument("--ccres", help="comma-separated target cCRE indices (vocabulary order)")
    p.add_argument("--genes", help="comma-separated genes whose promoter cCREs are the targets")
    p.add_argument("--tss", help="TSS BED6 (../shared/data/hg19_tss.bed.gz / hg38_tss.bed.gz) or a GTF")
    p.add_argument("--vocab", help="vocab.bed of the corpus (default: <input>/vocab.bed)")
    p.add_argument("--upstream", type=int, default=2000, help="promoter window upstream of the TSS (default 2000)")
    p.add_argument("--downstream", type=int, default=500, help="promoter window downstream (default 500)")
    p.add_argument("--num-heads", type=int, help="attention heads (if the checkpoint has no side file)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="fine-tune (SR + CCA) on the cells first for N steps (default 0 = zero-shot)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--n-reference", type=int, default=1000, help="chimeric reference cells (default 1000)")
    p.add_argument("--n-query", type=int, default=50, help="query chimeras at score 0.5 (default 50)")
    p.add_argument("--n-random", type=int, default=50, help="random cCRE knockouts (default 50)")
    p.add_argument("--k", type=int, default=20, help="reference neighbours (default 20)")
    p.add_argument("--alternative", choices=["less", "greater", "two-sided"], default="less",
                   help="t-test alternative: less = the knockout lowers the score more than random (default)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.set_defaults(func=_knockout)
