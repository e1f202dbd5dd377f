"""Genomic interval primitives, vectorised with numpy (0-based, half-open, BED convention).

Intervals are passed as three parallel arrays (``chrom`` strings, ``start``, ``end`` int64) or as a
DataFrame with columns ``chrom``, ``start``, ``end``. Chromosome names are normalised to the UCSC
style (``1`` -> ``chr1``, ``MT`` -> ``chrM``) by :func:`normalize_chrom`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PRIMARY_CHROMS = [f"chr{i}" for i in range(1, 23)] + ["chrX", "chrY", "chrM"]
_CHROM_RANK = {c: i for i, c in enumerate(PRIMARY_CHROMS)}


def _factorize(chrom):
    """(codes, unique names as str) of a 1-D array of names; hash-based (fast on millions)."""
    arr = np.asarray(chrom).ravel()
    codes, uniq = pd.factorize(arr, sort=False, use_na_sentinel=False)
    return codes.astype(np.int64), [str(u) for u in uniq]


def _normalize_one(c: str) -> str:
    base = c[3:] if c[:3].lower() == "chr" else c
    if base.upper() in ("M", "MT"):
        base = "M"
    elif base.upper() in ("X", "Y"):
        base = base.upper()
    return "chr" + base


def normalize_chrom(chrom) -> np.ndarray:
    """UCSC-style names: ``1``/``chr1``/``Chr1`` -> ``chr1``; ``MT``/``M``/``chrMT`` -> ``chrM``.

    Works on an array of names (vectorised over the unique values); returns a numpy str array of
    the same shape.
    """
    arr = np.asarray(chrom)
    if arr.size == 0:
        return arr.astype(str)
    codes, uniq = _factorize(arr)
    fixed = np.asarray([_normalize_one(c) for c in uniq], dtype=str)
    return fixed[codes].reshape(arr.shape)


def chrom_sort_key(chrom) -> np.ndarray:
    """Karyotypic rank (chr1..chr22, X, Y, M), other contigs after them in name order."""
    arr = np.asarray(chrom)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    codes, uniq = _factorize(arr)
    others = sorted(c for c in set(uniq) if c not in _CHROM_RANK)
    other_rank = {c: len(PRIMARY_CHROMS) + i for i, c in enumerate(others)}
    ranks = np.array([_CHROM_RANK.get(c, other_rank.get(c)) for c in uniq], dtype=np.int64)
    return ranks[codes].reshape(arr.shape)


def sort_intervals(df: pd.DataFrame) -> pd.DataFrame:
    """Stable sort by (chrom karyotypic, start, end)."""
    key = chrom_sort_key(df["chrom"].to_numpy())
    order = np.lexsort((df["end"].to_numpy(), df["start"].to_numpy(), key))
    return df.iloc[order].reset_index(drop=True)


def merge_intervals(df: pd.DataFrame, gap: int = 0) -> pd.DataFrame:
    """Merge overlapping intervals (and those closer than ``gap`` bp) into longer ones.

    Returns a sorted DataFrame with columns chrom, start, end, n_merged (how many inputs each holds).
    Book-ended intervals (end == next start) are not merged unless ``gap > 0``.
    """
    if len(df) == 0:
        return pd.DataFrame({"chrom": [], "start": [], "end": [], "n_merged": []}).astype(
            {"start": np.int64, "end": np.int64, "n_merged": np.int64})
    s = sort_intervals(df[["chrom", "start", "end"]])
    chrom = s["chrom"].to_numpy().astype(str)
    start = s["start"].to_numpy(np.int64)
    end = s["end"].to_numpy(np.int64)
    new_chrom = np.r_[True, chrom[1:] != chrom[:-1]]
    # running max of ends within each chromosome
    key = chrom_sort_key(chrom)
    offset = key.astype(np.int64) * (int(end.max()) + 1)
    run_end = np.maximum.accumulate(end + offset) - offset
    # a new merged block starts where the interval begins at or after the running end (+ gap)
    new_block = new_chrom | np.r_[True, start[1:] >= run_end[:-1] + gap]
    block = np.cumsum(new_block) - 1
    first = np.flatnonzero(new_block)
    out_end = np.maximum.reduceat(end, first)
    return pd.DataFrame({
        "chrom": chrom[first],
        "start": start[first],
        "end": out_end,
        "n_merged": np.bincount(block).astype(np.int64),
    })


def overlap_pairs(a_chrom, a_start, a_end, b_chrom, b_start, b_end):
    """All pairs (i, j) with interval ``a[i]`` overlapping ``b[j]`` (at least 1 bp, half-open).

    Fully vectorised per chromosome with a sorted sweep: for each ``a``, the candidate ``b`` are those
    whose start lies in ``[a.start - max_len_b + 1, a.end)``; candidates are expanded with
    ``np.repeat`` and filtered on ``b.end > a.start``. ``b`` may contain overlapping intervals.
    Returns two int64 arrays ``(ia, ib)`` sorted by ``ia`` then ``b`` start.
    """
    a_chrom = np.asarray(a_chrom).astype(str)
    b_chrom = np.asarray(b_chrom).astype(str)
    a_start = np.asarray(a_start, dtype=np.int64)
    a_end = np.asarray(a_end, dtype=np.int64)
    b_start = np.asarray(b_start, dtype=np.int64)
    b_end = np.asarray(b_end, dtype=np.int64)
    out_a, out_b = [], []
    b_uniq, b_inv = np.unique(b_chrom, return_inverse=True)
    a_uniq, a_inv = np.unique(a_chrom, return_inverse=True)
    b_index = {c: np.flatnonzero(b_inv == k) for k, c in enumerate(b_uniq)}
    for k, c in enumerate(a_uniq):
        if c not in b_index:
            continue
        ia_all = np.flatnonzero(a_inv == k)
        ib_all = b_index[c]
        order = np.argsort(b_start[ib_all], kind="stable")
        ib_sorted = ib_all[order]
        bs, be = b_start[ib_sorted], b_end[ib_sorted]
        max_len = int((be - bs).max()) if len(bs) else 0
        ast, aen = a_start[ia_all], a_end[ia_all]
        lo = np.searchsorted(bs, ast - max_len + 1, side="left")
        hi = np.searchsorted(bs, aen, side="left")
        n = np.maximum(hi - lo, 0)
        if n.sum() == 0:
            continue
        rep_a = np.repeat(np.arange(len(ia_all)), n)
        cand = np.repeat(lo, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        keep = be[cand] > ast[rep_a]
        out_a.append(ia_all[rep_a[keep]])
        out_b.append(ib_sorted[cand[keep]])
    if not out_a:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ia = np.concatenate(out_a)
    ib = np.concatenate(out_b)
    order = np.argsort(ia, kind="stable")
    return ia[order], ib[order]
