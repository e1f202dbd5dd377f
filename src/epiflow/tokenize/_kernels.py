"""Compiled (numba) inner loops of :mod:`epiflow.tokenize.core`.

Internal module. Each kernel works on one row-aligned block of a CSR matrix and is called from the
thread pool of ``core`` (``nogil=True``); ``cache=True`` compiles once per installation and dtype.
They replace numpy gathers (``np.take`` / fancy indexing check every index and were the bottleneck:
~4 ns per value against ~1 ns here) and fuse several passes into one. The arithmetic is IEEE with
no fast-math, so the results are bit-identical to the numpy expressions they replace.
"""

from __future__ import annotations

import numba as nb
import numpy as np

_MASK63 = np.uint64(0x7FFF_FFFF_FFFF_FFFF)


@nb.njit(cache=True, nogil=True, boundscheck=False)
def tfidf_block(data, indices, indptr, r0, r1, inv_rs, inv_df, out):
    """``out[p] = float64(float32(x_p) * inv_rs[row]) * inv_df[col_p] * 10000`` for the stored values
    of rows ``[r0, r1)`` (``log1p`` is left to numpy). No checks: the caller validates the counts
    and ``inv_df``. The inner loop runs over row slices so that LLVM vectorises the gather."""
    for r in range(r0, r1):
        f = inv_rs[r]
        a = np.int64(indptr[r])
        b = np.int64(indptr[r + 1])
        x, ix, o = data[a:b], indices[a:b], out[a:b]
        for p in range(b - a):
            o[p] = np.float64(np.float32(x[p]) * f) * inv_df[ix[p]] * 10000.0


@nb.njit(cache=True, nogil=True, boundscheck=False)
def build_keys(bits, indptr, r0, r1, shift, nbits, rshift, key):
    """Sort keys of the positive float64 values (``bits`` = their uint64 view) of rows ``[r0, r1)``:
    ``(row in block << rshift) | ((MASK63 - bits) >> shift) << nbits | position in block``."""
    s = indptr[r0]
    for r in range(r0, r1):
        rk = np.uint64(r - r0) << rshift
        for p in range(indptr[r], indptr[r + 1]):
            i = p - s
            key[i] = rk | (((_MASK63 - bits[p]) >> shift) << nbits) | np.uint64(i)


@nb.njit(cache=True, nogil=True, boundscheck=False)
def unpack_sorted(key, nbits, d, cols, use_cols, base, order, values, ids):
    """From sorted keys: ``order`` = positions in the block, ``values = d[order]`` and ``ids`` =
    ``cols[order] + base`` (or ``order + base`` without ``cols``).

    Values whose truncated bits tie share a key group (same row, same high bits) and come out in
    position order; inside such a group the values are put in exact descending order by a stable
    insertion sort (equal values keep ascending position). The groups are tiny in practice (values
    a few ulps apart); if the moves exceed ``4 n`` (a pathological input) the kernel stops and
    returns False, and the caller repairs with an exact sort instead. Returns True when done."""
    low = (np.uint64(1) << nbits) - np.uint64(1)
    n = key.shape[0]
    budget = 4 * n
    gstart = 0
    prev_hi = np.uint64(0)
    for i in range(n):
        k = key[i]
        o = np.int64(k & low)
        v = d[o]
        hi = k >> nbits
        if i == 0 or hi != prev_hi:
            gstart = i
            prev_hi = hi
        j = i
        while j > gstart and values[j - 1] < v:
            values[j] = values[j - 1]
            order[j] = order[j - 1]
            j -= 1
        budget -= i - j
        if budget < 0:
            return False
        values[j] = v
        order[j] = o
    if use_cols:
        for i in range(n):
            ids[i] = np.int64(cols[order[i]]) + base
    else:
        for i in range(n):
            ids[i] = order[i] + base
    return True


def warmup() -> None:
    """Compile (or load from the cache) the kernels for the usual dtypes (CSR from scipy: int32 or
    int64 indices and indptr; float32 or float64 counts)."""
    out = np.empty(1)
    for it in (np.int32, np.int64):
        indptr = np.array([0, 1], dtype=it)
        for dt in (np.float32, np.float64):
            tfidf_block(np.ones(1, dt), np.zeros(1, it), indptr, 0, 1, np.ones(1, np.float32),
                        np.ones(1), out)
    indptr = np.array([0, 1], dtype=np.int64)
    key = np.zeros(1, dtype=np.uint64)
    build_keys(np.ones(1).view(np.uint64), indptr, 0, 1, np.uint64(40), np.uint64(1),
               np.uint64(63), key)
    for it in (np.int32, np.int64):
        unpack_sorted(key, np.uint64(1), np.ones(1), np.zeros(1, it), True, 4,
                      np.empty(1, np.int64), np.empty(1), np.empty(1, np.int64))
