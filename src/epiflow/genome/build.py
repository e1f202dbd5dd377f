"""Genome build detection (hg19 vs hg38) from the data itself.

Open chromatin is enriched at transcription start sites, so the fraction of peaks or fragments
whose midpoint lies within ``window`` bp of an annotated TSS is high for the right build and falls
towards the background level for the wrong one (coordinates of most genes differ by kilobases to
megabases between hg19 and hg38). :func:`detect_build` computes that fraction for every candidate
build; :func:`check_build` stops with a clear message when a confident call disagrees with the
declared build.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import GenomeBuildError
from .bed import normalize_genome, read_bed
from .intervals import normalize_chrom

log = logging.getLogger(__name__)

#: At most this many intervals are scored (a seeded uniform subsample).
MAX_INTERVALS = 200_000
#: A call is confident when the best build's score is at least RATIO times the runner-up's, at least
#: MIN_MARGIN above it, and at least MIN_INTERVALS intervals on chromosomes of the TSS sets were scored.
RATIO = 1.5
MIN_MARGIN = 0.02
MIN_INTERVALS = 200


@dataclass
class BuildReport:
    """Result of :func:`detect_build`.

    ``build`` is the confident call (``'hg19'``/``'hg38'``) or ``'unknown'``; ``scores`` maps each
    build to the fraction of scored intervals whose midpoint is within ``window`` bp of one of its
    TSS; ``margin`` = best score - runner-up score; ``n`` = number of intervals scored.
    """

    build: str
    scores: dict
    margin: float
    n: int = 0
    window: int = 1000
    best: str = ""
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"build": self.build, "best": self.best, "scores": dict(self.scores),
                "margin": self.margin, "n": self.n, "window": self.window, **self.details}


def packaged_tss() -> dict[str, dict[str, np.ndarray]]:
    """The TSS positions that ship with epiflow (``genome/data/tss_<build>.npz``, made by
    ``scripts/build_tss_data.py`` from the project's hg19/hg38 TSS BED files): ``{build: {chrom:
    sorted positions}}`` for hg19 and hg38. Used when no TSS files are configured, so that genome-build
    detection is on by default with nothing to configure."""
    global _PACKAGED
    if _PACKAGED is None:
        from importlib.resources import files

        out = {}
        for b in ("hg19", "hg38"):
            with files("epiflow.genome").joinpath("data", f"tss_{b}.npz").open("rb") as fh:
                z = np.load(fh)
                out[b] = {c: np.cumsum(z[c].astype(np.int64)) for c in z.files}
        _PACKAGED = out
    return _PACKAGED


_PACKAGED = None


def _tss_positions(obj) -> dict[str, np.ndarray]:
    """chrom -> sorted unique TSS positions, from a BED path, a DataFrame (chrom, start[, end, strand])
    or already such a dict (e.g. from :func:`packaged_tss`)."""
    if isinstance(obj, dict):
        return obj
    df = obj if isinstance(obj, pd.DataFrame) else read_bed(obj)
    chrom = normalize_chrom(df["chrom"].to_numpy())
    start = df["start"].to_numpy(np.int64)
    if "end" in df.columns:
        end = df["end"].to_numpy(np.int64)
        pos = start
        if "strand" in df.columns:
            minus = df["strand"].astype(str).to_numpy() == "-"
            wide = (end - start) > 1
            pos = np.where(minus & wide, end - 1, start)
    else:
        pos = start
    out = {}
    uniq, inv = np.unique(chrom, return_inverse=True)
    for k, c in enumerate(uniq):
        out[c] = np.unique(pos[inv == k])
    return out


def tss_fraction(chrom, mid, tss: dict[str, np.ndarray], window: int) -> float:
    """Fraction of positions ``mid`` within ``window`` bp of a TSS (on the same chromosome)."""
    n = len(mid)
    if n == 0:
        return 0.0
    near = np.zeros(n, dtype=bool)
    uniq, inv = np.unique(chrom, return_inverse=True)
    for k, c in enumerate(uniq):
        t = tss.get(c)
        if t is None or len(t) == 0:
            continue
        rows = np.flatnonzero(inv == k)
        p = mid[rows]
        j = np.searchsorted(t, p)
        left = np.abs(p - t[np.maximum(j - 1, 0)])
        right = np.abs(t[np.minimum(j, len(t) - 1)] - p)
        near[rows] = np.minimum(left, right) <= window
    return float(near.mean())


def detect_build(chrom, start, end, *, tss: dict, window: int = 1000, max_intervals: int = MAX_INTERVALS,
                 seed: int = 0) -> BuildReport:
    """Guess the genome build of intervals from their proximity to each build's TSS.

    ``tss`` maps a build name (``'hg19'``, ``'hg38'``) to a TSS BED path or DataFrame. Up to
    ``max_intervals`` intervals (seeded uniform subsample) are scored; only those on chromosomes
    present in every TSS set count.
    """
    chrom = normalize_chrom(np.asarray(chrom).astype(str).ravel())
    start = np.asarray(start, dtype=np.int64).ravel()
    end = np.asarray(end, dtype=np.int64).ravel()
    if not tss:
        raise ValueError("detect_build needs at least one TSS set")
    tss_pos = {normalize_genome(b, field="tss"): _tss_positions(t) for b, t in tss.items()}
    common = set.intersection(*(set(v) for v in tss_pos.values()))
    on = np.isin(chrom, np.asarray(sorted(common), dtype=str)) if len(chrom) else np.zeros(0, bool)
    idx = np.flatnonzero(on)
    if len(idx) > max_intervals:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(idx, size=max_intervals, replace=False))
    c = chrom[idx]
    mid = (start[idx] + end[idx]) // 2
    scores = {b: tss_fraction(c, mid, t, window) for b, t in tss_pos.items()}
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    best, s1 = ranked[0]
    s2 = ranked[1][1] if len(ranked) > 1 else 0.0
    margin = float(s1 - s2)
    confident = (len(idx) >= MIN_INTERVALS and margin >= MIN_MARGIN and s1 >= RATIO * s2)
    build = best if confident and len(ranked) > 1 else "unknown"
    details = {"n_total": int(len(chrom)), "n_on_tss_chroms": int(on.sum()), "confident": bool(confident)}
    rep = BuildReport(build=build, scores=scores, margin=margin, n=int(len(idx)), window=int(window),
                      best=best, details=details)
    log.debug("build detection: %s", rep.to_dict())
    return rep


def check_build(declared: str, report: BuildReport, *, path=None, dataset=None) -> None:
    """Raise :class:`GenomeBuildError` when the detected build is confident and differs from ``declared``."""
    declared_n = normalize_genome(declared, path=path)
    if report.build in ("unknown", declared_n):
        if report.build == "unknown":
            log.info("%s: genome build could not be confirmed from the data (scores %s); trusting "
                     "the declared %s", dataset or path or "data", _fmt_scores(report), declared_n)
        return None
    who = f"dataset '{dataset}'" if dataset else "the data"
    of = f" of dataset '{dataset}'" if dataset else " (or --declared)"
    raise GenomeBuildError(
        f"{who} is declared {declared_n} but its intervals look like {report.build}: fraction of intervals whose "
        f"midpoint is within {report.window} bp of a TSS: {_fmt_scores(report)} (n={report.n})",
        path=path, field="genome",
        fix=f"set the manifest's genome field{of} to {report.build} if that is its build, or lift "
            f"the data to {declared_n} with a chain (`epiflow liftover`).")


def _fmt_scores(report: BuildReport) -> str:
    return ", ".join(f"{b} {s:.3f}" for b, s in sorted(report.scores.items()))


def find_tss_files(tss_dir) -> dict[str, Path]:
    """``{build: path}`` of ``<build>_tss.bed[.gz]`` files in a folder (e.g. ``../shared/data``)."""
    out = {}
    d = Path(tss_dir)
    for b in ("hg19", "hg38"):
        for name in (f"{b}_tss.bed.gz", f"{b}_tss.bed"):
            if (d / name).exists():
                out[b] = d / name
                break
    return out


# --------------------------------------------------------------------------------------------------
# light readers of intervals for detection (BED, fragments, h5ad peak names)
# --------------------------------------------------------------------------------------------------

_NAME_RE = r"^(?P<chrom>.+)[:_-](?P<start>\d+)[-_](?P<end>\d+)$"


def sniff_format(path) -> str:
    """'h5ad', 'fragments' or 'bed' from the file name (fragments: name contains 'fragments')."""
    name = Path(path).name.lower()
    if name.endswith(".h5ad"):
        return "h5ad"
    if "fragments" in name:
        return "fragments"
    return "bed"


def intervals_from_var(var: pd.DataFrame, *, path=None) -> pd.DataFrame:
    """Peaks of an AnnData ``var``: chrom/start/end columns, else names ``chr:start-end`` / ``chr_start_end``."""
    cols = {c.lower(): c for c in var.columns}
    if all(k in cols for k in ("chrom", "start", "end")) or all(k in cols for k in ("chr", "start", "end")):
        cc = cols.get("chrom", cols.get("chr"))
        return pd.DataFrame({"chrom": normalize_chrom(var[cc].astype(str).to_numpy()),
                             "start": pd.to_numeric(var[cols["start"]]).to_numpy(np.int64),
                             "end": pd.to_numeric(var[cols["end"]]).to_numpy(np.int64)})
    names = pd.Series(var.index.astype(str))
    m = names.str.extract(_NAME_RE)
    ok = m["chrom"].notna().to_numpy()
    if not ok.any():
        from ..errors import InputFormatError

        raise InputFormatError(
            f"cannot find peak coordinates: no chrom/start/end columns in var and names like "
            f"{names.iloc[0]!r} are not 'chr:start-end' or 'chr_start_end'", path=path, field="var",
            fix="add var columns chrom, start, end (0-based, half-open) or name peaks 'chr1:100-600'.")
    m = m[ok]
    return pd.DataFrame({"chrom": normalize_chrom(m["chrom"].to_numpy()),
                         "start": m["start"].astype(np.int64).to_numpy(),
                         "end": m["end"].astype(np.int64).to_numpy()})


def load_intervals(path, fmt: str = "auto", *, max_lines: int = 500_000) -> pd.DataFrame:
    """Intervals (chrom, start, end) of a BED file, the first ``max_lines`` of a fragments file, or
    the peaks of an h5ad file (var only is read)."""
    from ..errors import InputFormatError

    path = Path(path)
    if not path.exists():
        raise InputFormatError("file not found", path=path, fix="check the path.")
    fmt = sniff_format(path) if fmt == "auto" else fmt
    if fmt == "bed":
        return read_bed(path)[["chrom", "start", "end"]]
    if fmt == "fragments":
        try:
            df = pd.read_csv(path, sep="\t", header=None, comment="#", usecols=[0, 1, 2],
                             names=["chrom", "start", "end"], nrows=max_lines,
                             dtype={"chrom": str, "start": np.int64, "end": np.int64})
        except (ValueError, pd.errors.ParserError) as exc:
            raise InputFormatError(f"cannot read fragments (chrom, start, end, barcode[, count]): {exc}",
                                   path=path, fix="give a 10x-style fragments file (tab-separated).") from None
        if len(df) == 0:
            raise InputFormatError("empty fragments file", path=path, fix="give a non-empty fragments file.")
        df["chrom"] = normalize_chrom(df["chrom"].to_numpy())
        return df
    if fmt == "h5ad":
        from ..corpus.readers import open_h5ad

        a = open_h5ad(path, backed="r")
        try:
            var = a.var.copy()
        finally:
            a.file.close()
        return intervals_from_var(var, path=path)
    raise ValueError(f"unknown format {fmt!r} (bed, fragments, h5ad)")
