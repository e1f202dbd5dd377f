"""The cCRE vocabulary: an external set used as is, or a curated one.

* External (:func:`load_external_vocab`): for example the authors' ``cCRE.bed`` (1,355,445 hg38
  cCREs) with ``cCRE_document_frequency.npy``. The FILE ORDER is the token order (cCRE j in line j
  has token id j + 4), so it is never re-sorted; this is what lets new data be embedded with
  published weights.
* Curated: :func:`candidate_ccres` takes the union of source interval sets (BED files and/or the
  peaks of the input datasets) and merges overlapping intervals into longer ones (sorted by
  chromosome, start); after accessibility has been counted over the corpus, :func:`filter_vocab`
  drops cCREs open in fewer than ``min_cells`` cells (default 100), keeping the order, and returns
  a per-cCRE stats table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputFormatError
from ..io import atomic_path
from .bed import read_bed, write_bed
from .intervals import chrom_sort_key, merge_intervals

log = logging.getLogger(__name__)

STATS_COLUMNS = ["chrom", "start", "end", "width", "n_merged", "cells_open", "kept"]


def load_external_vocab(bed_path, df_path=None) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Read an external cCRE vocabulary in file order (= token order) and optionally its document
    frequency vector (``.npy``, one value per cCRE).

    Returns ``(vocab, df)`` where ``vocab`` has columns chrom, start, end (index 0..n-1 = cCRE
    index) and ``df`` is float64 or None. Raises InputFormatError when the df vector is not 1-D,
    has another length, or holds negative / non-finite values.
    """
    bed = read_bed(bed_path)
    vocab = bed[["chrom", "start", "end"]].reset_index(drop=True)
    dup = vocab.duplicated(["chrom", "start", "end"])
    if dup.any():
        log.warning("%s: %d duplicated cCRE interval(s) in the external vocabulary (kept: the file "
                    "order defines token ids)", bed_path, int(dup.sum()))
    if df_path is None:
        return vocab, None
    df_path = Path(df_path)
    try:
        df = np.load(df_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputFormatError(f"cannot read the document-frequency array: {exc}", path=df_path,
                               fix="give a .npy file saved with numpy.save (one value per cCRE).") from None
    df = np.asarray(df)
    if df.ndim != 1:
        df = df.squeeze()
    if df.ndim != 1 or not np.issubdtype(df.dtype, np.number):
        raise InputFormatError(f"document frequency must be a 1-D numeric array, got shape {df.shape} "
                               f"and dtype {df.dtype}", path=df_path,
                               fix="give one value per cCRE of the vocabulary, in its order.")
    if len(df) != len(vocab):
        raise InputFormatError(
            f"document frequency has {len(df)} values but the vocabulary {bed_path} has {len(vocab)} "
            "cCREs", path=df_path, fix="use the document-frequency file that belongs to this cCRE set.")
    df = df.astype(np.float64)
    bad = ~np.isfinite(df) | (df < 0)
    if bad.any():
        raise InputFormatError(
            f"document frequency has {int(bad.sum())} negative or non-finite value(s) (first at index "
            f"{int(np.flatnonzero(bad)[0])})", path=df_path,
            fix="use the document-frequency file that belongs to this cCRE set.")
    return vocab, df


def candidate_ccres(interval_sets: list[pd.DataFrame], *, gap: int = 0) -> pd.DataFrame:
    """Union of interval sets, overlapping intervals merged into longer ones (and those closer than
    ``gap`` bp). Sorted by (chrom karyotypic, start); columns chrom, start, end, n_merged."""
    if not interval_sets:
        raise ValueError("candidate_ccres needs at least one interval set")
    parts = []
    for k, s in enumerate(interval_sets):
        missing = [c for c in ("chrom", "start", "end") if c not in s.columns]
        if missing:
            raise ValueError(f"interval set {k} lacks column(s) {missing}")
        parts.append(s[["chrom", "start", "end"]])
    allint = pd.concat(parts, ignore_index=True)
    merged = merge_intervals(allint, gap=int(gap))
    log.info("candidate cCREs: %d input intervals from %d set(s) -> %d merged", len(allint),
             len(interval_sets), len(merged))
    return merged.reset_index(drop=True)


def filter_vocab(candidates: pd.DataFrame, cells_open, min_cells: int = 100
                 ) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Keep the candidates open in at least ``min_cells`` cells, in their order.

    ``cells_open[i]`` = number of corpus cells in which candidate ``i`` is accessible. Returns
    ``(vocab, keep_index, stats)``: ``vocab`` (chrom, start, end; row j = cCRE j), ``keep_index``
    (int64 candidate indices, increasing) and ``stats`` with one row per candidate (chrom, start,
    end, width, n_merged, cells_open, kept).
    """
    cells_open = np.asarray(cells_open).ravel()
    if len(cells_open) != len(candidates):
        raise ValueError(f"cells_open has {len(cells_open)} values for {len(candidates)} candidates")
    if len(candidates) > 1:
        key = chrom_sort_key(candidates["chrom"].to_numpy())
        st = candidates["start"].to_numpy(np.int64)
        unsorted = (np.diff(key) < 0) | ((np.diff(key) == 0) & (np.diff(st) < 0))
        if unsorted.any():
            log.warning("candidate cCREs are not sorted by (chrom, start); the vocabulary keeps their order")
    keep = cells_open >= min_cells
    keep_index = np.flatnonzero(keep).astype(np.int64)
    vocab = candidates.iloc[keep_index][["chrom", "start", "end"]].reset_index(drop=True)
    vocab["start"] = vocab["start"].astype(np.int64)
    vocab["end"] = vocab["end"].astype(np.int64)
    n_merged = (candidates["n_merged"].to_numpy(np.int64) if "n_merged" in candidates.columns
                else np.ones(len(candidates), dtype=np.int64))
    stats = pd.DataFrame({
        "chrom": candidates["chrom"].to_numpy(),
        "start": candidates["start"].to_numpy(np.int64),
        "end": candidates["end"].to_numpy(np.int64),
        "width": (candidates["end"].to_numpy(np.int64) - candidates["start"].to_numpy(np.int64)),
        "n_merged": n_merged,
        "cells_open": cells_open.astype(np.int64),
        "kept": keep,
    })
    log.info("vocabulary: %d of %d candidate cCREs open in >= %d cells", len(keep_index),
             len(candidates), min_cells)
    return vocab, keep_index, stats


def vocab_summary(stats: pd.DataFrame) -> dict:
    """Headline figures of a stats table (counts, widths of the kept cCREs)."""
    kept = stats[stats["kept"].astype(bool)]
    w = kept["width"].to_numpy()
    return {
        "n_candidates": int(len(stats)),
        "n_kept": int(len(kept)),
        "n_dropped": int(len(stats) - len(kept)),
        "width_median": float(np.median(w)) if len(w) else 0.0,
        "width_mean": float(w.mean()) if len(w) else 0.0,
        "n_merged_gt1": int((kept["n_merged"] > 1).sum()),
    }


def write_vocab(vocab: pd.DataFrame, path) -> Path:
    """Write the vocabulary as BED3 in token order (atomic)."""
    return write_bed(vocab[["chrom", "start", "end"]], path)


def write_vocab_stats(stats: pd.DataFrame, path) -> Path:
    """Write the per-candidate stats table as TSV with a header (atomic)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        stats.to_csv(tmp, sep="\t", index=False)
    return path
