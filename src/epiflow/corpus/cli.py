"""CLI verbs of the corpus stage: ``candidate-ccres``, ``map-dataset``, ``build-corpus``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _sidecar(bed: str | Path) -> Path:
    return Path(str(bed) + ".json")


def _candidate_ccres(args) -> int:
    from ..genome.bed import write_bed
    from ..io import atomic_write_text
    from .build import candidate_set
    from .manifest import load_manifest

    entries = load_manifest(args.manifest) if args.manifest else []
    cand, info = candidate_set(entries, args.genome, sources=args.sources or (),
                               external_vocab=args.external_vocab, chain=args.chain,
                               data_mirror=args.data_mirror)
    if args.external_df:
        from ..errors import ConfigError
        from ..genome.ccre import load_external_vocab

        if not args.external_vocab:
            raise ConfigError("--external-df needs --external-vocab", field="external_df",
                              fix="give the cCRE BED that the document frequencies belong to")
        load_external_vocab(args.external_vocab, args.external_df)  # validates the length
        info["external_df"] = str(Path(args.external_df).resolve())
    write_bed(cand[["chrom", "start", "end"]], args.out)
    report = args.report or _sidecar(args.out)
    atomic_write_text(report, json.dumps(info, indent=2))
    log.info("%d candidate cCREs -> %s", len(cand), args.out)
    return 0


def _map_dataset(args) -> int:
    from ..genome.bed import read_bed
    from .manifest import get_dataset, load_manifest
    from .mapping import map_dataset, write_mapped

    entry = get_dataset(load_manifest(args.manifest), args.dataset)
    ccres = read_bed(args.ccres)[["chrom", "start", "end"]]
    tss = None if args.no_build_check else "builtin"
    if args.tss_dir and not args.no_build_check:
        from ..genome.build import find_tss_files

        tss = find_tss_files(args.tss_dir)
        if len(tss) < 2:
            from ..errors import ConfigError

            raise ConfigError(f"--tss-dir {args.tss_dir} lacks hg19_tss.bed[.gz] and hg38_tss.bed[.gz]",
                              field="tss_dir", fix="point it at a folder with both files, or leave it unset "
                                                   "(the TSS tables shipped with epiflow are used)")
    adata, report = map_dataset(entry, ccres, args.genome, chain=args.chain, tss=tss,
                                data_mirror=args.data_mirror, use_count_column=args.use_count_column,
                                chunksize=args.chunksize, progress=True,
                                min_frac_in_ccres=args.min_frac_in_ccres)
    report_path = args.report or Path(args.out).with_suffix(".json")
    write_mapped(adata, args.out, report, report_path)
    log.info("%s: %d cells x %d cCREs -> %s", entry.name, adata.n_obs, adata.n_vars, args.out)
    return 0


def _read_sidecar(ccres) -> dict:
    """The candidate set's JSON summary (vocabulary mode, external df, genome), or {} when absent or unreadable."""
    sp = _sidecar(ccres)
    if not sp.exists():
        return {}
    try:
        return json.loads(sp.read_text())
    except json.JSONDecodeError:
        return {}


def _build_corpus(args) -> int:
    from .build import build_corpus

    side = _read_sidecar(args.ccres)
    vocabulary = args.vocabulary_mode or ("external" if side.get("mode") == "external" else "curate")
    external_df = args.external_df or (side.get("external_df") if vocabulary == "external" else None)
    genome = args.genome or side.get("genome", "")
    corpus = build_corpus(args.ccres, args.mapped, args.out, genome=genome, min_cells=args.min_cells_per_ccre,
                          min_ccres_per_cell=args.min_ccres_per_cell, shard_size=args.shard_size,
                          vocabulary=vocabulary, external_df=external_df, progress=True)
    print(json.dumps({"out": str(args.out), "n_cells": corpus.n_cells, "n_ccres": corpus.n_ccres,
                      "shards": len(corpus.shard_paths), "vocab_id": corpus.vocab_id}))
    return 0


def _tokenize_downstream(args) -> int:
    from .build import tokenize_downstream

    side = _read_sidecar(args.ccres)
    df = args.df or (side.get("external_df") if args.corpus is None else None)
    vocab = args.vocab or (args.ccres if args.corpus is None and side.get("mode") == "external" else None)
    out = tokenize_downstream(args.ccres, args.mapped, args.out, corpus=args.corpus, vocab=vocab, df=df,
                              genome=args.genome or side.get("genome", ""),
                              min_ccres_per_cell=args.min_ccres_per_cell, shard_size=args.shard_size,
                              progress=True)
    print(json.dumps({"out": str(args.out), "n_cells": out.n_cells, "n_ccres": out.n_ccres,
                      "shards": len(out.shard_paths), "vocab_id": out.vocab_id}))
    return 0


def register(sub) -> None:
    p = sub.add_parser("candidate-ccres", help="candidate cCREs: merged union of peak sets, or an external vocabulary",
                       description="Union of --sources BED files and the peaks of the manifest's datasets "
                                   "(lifted to --genome), overlapping intervals merged; or, with "
                                   "--external-vocab, that BED unchanged (file order = token order). "
                                   "Writes OUT (BED3) and OUT.json (summary).")
    p.add_argument("--manifest", help="dataset manifest (TSV or YAML)")
    p.add_argument("--genome", required=True, choices=["hg19", "hg38"], help="corpus genome build")
    p.add_argument("--sources", nargs="*", default=[], help="extra BED files of cCREs/peaks (in --genome)")
    p.add_argument("--external-vocab", help="external cCRE BED used as is (e.g. the authors' cCRE.bed)")
    p.add_argument("--external-df", help="its document frequency .npy (e.g. cCRE_document_frequency.npy)")
    p.add_argument("--chain", help="chain file/URL/builtin:NAME for datasets in another build")
    p.add_argument("--data-mirror", help="folder searched for dataset files before downloading")
    p.add_argument("--report", "--stats", dest="report", metavar="FILE",  # --stats: its former name
                   help="summary JSON (default OUT.json)")
    p.add_argument("--out", required=True, metavar="FILE", help="candidate cCRE BED")
    p.set_defaults(func=_candidate_ccres)

    p = sub.add_parser("map-dataset", help="map one dataset onto the candidate cCREs (cells x cCREs counts)",
                       description="Reads one manifest dataset (fragments, 10x h5/mtx, h5ad), checks its "
                                   "file, chromosomes and genome build, lifts it to --genome if needed, and "
                                   "counts fragments (per overlapped cCRE, weighted by the count column unless --no-count-column) or "
                                   "peaks (X @ peak-cCRE incidence) per cCRE.")
    p.add_argument("--manifest", required=True)
    p.add_argument("--dataset", required=True, help="dataset name in the manifest")
    p.add_argument("--ccres", required=True, help="candidate cCRE BED (from candidate-ccres)")
    p.add_argument("--genome", required=True, choices=["hg19", "hg38"])
    p.add_argument("--chain", help="chain file/URL/builtin:NAME (default: builtin where available)")
    p.add_argument("--tss-dir", help="folder with hg19_tss.bed.gz and hg38_tss.bed.gz for the genome-build "
                                     "check (default: the TSS tables shipped with epiflow)")
    p.add_argument("--no-build-check", action="store_true",
                   help="do not check the declared genome build against the data (TSS proximity)")
    p.add_argument("--min-frac-in-ccres", type=float, default=None,
                   help="stop when less than this fraction of the fragments (peak counts) fall in the cCREs "
                        "(default 0.10; 0 disables)")
    p.add_argument("--data-mirror", help="folder searched for dataset files before downloading")
    p.add_argument("--use-count-column", dest="use_count_column", action="store_true", default=True,
                   help="weight each fragment by its 5th (count) column (the default, as the authors' code)")
    p.add_argument("--no-count-column", dest="use_count_column", action="store_false",
                   help="count every fragment once per overlapped cCRE (default: weight it by its 5th "
                        "column, as the authors' code)")
    p.add_argument("--chunksize", type=int, default=2_000_000, help="fragment lines per chunk")
    p.add_argument("--out", required=True, metavar="FILE", help="mapped AnnData (.h5ad)")
    p.add_argument("--report", metavar="FILE", help="mapping report JSON (default OUT with .json)")
    p.set_defaults(func=_map_dataset)

    p = sub.add_parser("build-corpus", help="QC, vocabulary, document frequency and tokenized shards",
                       description="Streams the mapped datasets: per-cell QC, vocabulary (curate: keep "
                                   "cCREs open in >= --min-cells-per-ccre cells; external: keep all), corpus "
                                   "document frequency, rank-ordered cell sentences in shards. Atomic output "
                                   "folder.")
    p.add_argument("--ccres", required=True, help="candidate cCRE BED (from candidate-ccres)")
    p.add_argument("--mapped", nargs="+", required=True, help="mapped datasets (.h5ad from map-dataset)")
    p.add_argument("--genome", choices=["hg19", "hg38"], help="default: from the candidates' .json")
    p.add_argument("--min-cells-per-ccre", "--min-cells", dest="min_cells_per_ccre", type=int,  # --min-cells:
                   default=100, help="drop cCREs open in fewer cells (curate)")  # its former name
    p.add_argument("--min-ccres-per-cell", type=int, default=100, help="drop cells with fewer accessible cCREs")
    p.add_argument("--shard-size", type=int, default=5000, help="cells per shard")
    p.add_argument("--vocabulary-mode", "--vocabulary", dest="vocabulary_mode", choices=["curate", "external"],
                   help="curate the candidates, or keep an external vocabulary as is (config vocabulary.mode; "
                        "default: 'external' if candidate-ccres was given --external-vocab, else 'curate'; "
                        "--vocabulary: its former name)")
    p.add_argument("--external-df", help="document frequency .npy to use (external vocabulary)")
    p.add_argument("--out", required=True, metavar="DIR", help="corpus folder")
    p.set_defaults(func=_build_corpus)

    p = sub.add_parser("tokenize-downstream",
                       help="tokenize downstream datasets onto the corpus vocabulary with the corpus df",
                       description="Writes downstream datasets (manifest role 'downstream', mapped onto the "
                                   "same candidate cCREs) as a corpus folder of the same format: per-cell QC, "
                                   "the corpus vocabulary (--corpus DIR: its vocab.bed and df.npy; or --vocab "
                                   "and --df, e.g. an external vocabulary when no corpus is built), global "
                                   "TF-IDF cell sentences in shards. These cells never enter the vocabulary "
                                   "count, the document frequency or pretraining.")
    p.add_argument("--ccres", required=True, help="candidate cCRE BED the datasets were mapped onto")
    p.add_argument("--mapped", nargs="+", required=True, help="mapped downstream datasets (.h5ad)")
    p.add_argument("--corpus", help="corpus folder whose vocab.bed and df.npy are used")
    p.add_argument("--vocab", help="vocabulary BED (candidate intervals in token order) instead of --corpus")
    p.add_argument("--df", help="document frequency .npy of that vocabulary (default with an external "
                                "vocabulary and no --corpus: the candidates' .json external_df)")
    p.add_argument("--genome", choices=["hg19", "hg38"], help="default: the corpus' or candidates' genome")
    p.add_argument("--min-ccres-per-cell", type=int, default=100, help="drop cells with fewer accessible cCREs")
    p.add_argument("--shard-size", type=int, default=5000, help="cells per shard")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (corpus format, role downstream)")
    p.set_defaults(func=_tokenize_downstream)
