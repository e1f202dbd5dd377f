"""CLI verb ``epiflow knockout``: in-silico cCRE knockout between two cell states."""

from __future__ import annotations


def _knockout(args) -> int:
    import numpy as np

    from ..cliargs import config_from_args
    from ..errors import InputFormatError
    from ..plots.knockout import knockout_figures
    from ..report.results import write_task_result
    from .common import corpus_df, corpus_vocab, load_cells, load_model
    from .config import KnockoutConfig
    from .knockout import knockout_targets, read_tss, run, tss_neighbourhood

    cfg = config_from_args(KnockoutConfig, args)
    cells = load_cells(args.corpus, df=args.df, dataset=args.dataset)
    tss = vocab = None
    if not cfg.target_ccres:
        tss = None if args.tss is None else read_tss(args.tss)
        if args.vocab is not None:
            from ..genome.bed import read_bed

            vocab = read_bed(args.vocab)
        else:
            vocab = corpus_vocab(args.corpus)
    targets = knockout_targets(cfg, tss=tss, vocab=vocab)
    # the chimeras are tokenized with the document frequencies of the model's corpus
    if args.df is not None:
        try:
            df = np.load(args.df)
        except (OSError, ValueError) as exc:
            raise InputFormatError(f"cannot read the document frequencies ({exc})", path=str(args.df),
                                   fix="pass the df.npy of the model's corpus") from None
    else:
        df = corpus_df(args.corpus)
    model = load_model(args.checkpoint, n_ccres=cells.n_ccres, vocab_id=cells.vocab_id, num_heads=cfg.num_heads, backend=cfg.backend,
                       device=cfg.device)
    res = run(cells, model, cfg, targets, df=df, neighbourhood=tss_neighbourhood(cfg, tss, vocab, targets))
    if cfg.figures:
        knockout_figures(res, args.out, seed=cfg.seed,
                         title=f"{cfg.state_a} -> {cfg.state_b}: in-silico knockout on {res.data['dataset']}")
    write_task_result(res, args.out)
    print(res.tables["knockout"].to_string(index=False))
    print(f"random single-cCRE knockouts: mean effect {res.data['random_effects'].mean():.4g}; "
          f"reference score r = {res.data['score_r']:.3f}")
    print(f"wrote {args.out}/knockout.tsv, random.tsv, reference_cells.tsv, shifts.tsv, tss_ccres.tsv and "
          "metrics.tsv")
    return 0


def register(subparsers) -> None:
    from ..cliargs import CELLS_HELP, add_config_args, add_io_args
    from .config import KnockoutConfig

    p = subparsers.add_parser(
        "knockout",
        help="in-silico cCRE knockout between two states (chimeric cells, 20-NN score change, t-test vs random)",
        description=(
            "OT-pair cells of two states (e.g. normal vs cancer), build chimeric reference cells with a score "
            "drawn uniformly in [0, 1] (fraction of cCREs from state B) and query chimeras at 0.5 with each "
            "target added then removed; the effect is the change of the mean score of the 20 nearest "
            "reference cells, tested one-sided (Welch t) against knockouts of as many random cCREs. Targets: "
            "--target-ccres (vocabulary indices) or --genes with --tss (BED6 TSS file or GTF; promoter windows "
            "of --promoter-upstream / --promoter-downstream bp); a target is each promoter cCRE, or with --target-unit gene all promoter cCREs of a gene at once "
            "(the paper's Fig. 5d-e); --group adds all of them at once. Writes "
            "OUT/knockout.tsv, random.tsv, reference_cells.tsv (UMAP and score of the reference cells), "
            "shifts.tsv (each query cell's position and score with each target added / removed), tss_ccres.tsv "
            "(cCREs within 10 kb of the target genes' promoter windows, accessible fraction per state; empty "
            "with --target-ccres), knockout_umap.png, knockout_effects.png, metrics.tsv."))
    add_io_args(p, cells_help="cells of both states: " + CELLS_HELP)
    g = p.add_argument_group("target files")
    g.add_argument("--tss", metavar="FILE",
                   help="TSS BED6 (../shared/data/hg19_tss.bed.gz / hg38_tss.bed.gz) or a GTF (for --genes)")
    g.add_argument("--vocab", metavar="BED", help="vocab.bed of the corpus (default: <corpus>/vocab.bed)")
    add_config_args(p, KnockoutConfig, group="settings")
    p.set_defaults(func=_knockout)
