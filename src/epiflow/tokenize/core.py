"""Global TF-IDF and cell sentences, fully vectorised (no per-cell Python loops).

Token ids follow the authors' convention: PAD = 0, CLS = 1, SEP = 2, 3 reserved (mask), and cCRE ``j``
(0-based column of the cell-by-cCRE matrix) is token ``j + 4``.

Sentences are stored CSR-like: ``tokens[indptr[i]:indptr[i+1]]`` are the token ids of cell ``i`` in
descending TF-IDF order. Ties are broken by ascending cCRE index (deterministic; the authors'
``np.argsort(-v)`` leaves ties in an unspecified order).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from ..errors import InputFormatError

PAD, CLS, SEP, MASK = 0, 1, 2, 3
NUM_SPECIAL = 4


def _canonical_csr(counts) -> sp.csr_matrix:
    if not sp.issparse(counts):
        counts = sp.csr_matrix(np.asarray(counts))
    counts = sp.csr_matrix(counts)
    if not counts.has_canonical_format:
        counts = counts.copy()
        counts.sum_duplicates()
    return counts


def _check_counts(data: np.ndarray, name: str = "counts") -> None:
    if data.size:
        lo, hi = data.min(), data.max()  # NaN propagates into both
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise InputFormatError(f"{name} contains NaN or infinite values",
                                   fix="clean the count matrix before tokenization")
        if lo < 0:
            raise InputFormatError(f"{name} contains negative values (min {lo})",
                                   fix="counts must be non-negative raw counts")


def _as_csr(counts, name: str = "counts") -> sp.csr_matrix:
    counts = _canonical_csr(counts)
    _check_counts(counts.data, name)
    return counts


_KERNEL_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.int32, np.int64))

BLOCK = 1 << 16  # stored values per work unit: a few hundred kB per array, in cache


def _threads(n_jobs: int | None) -> int:
    """``n_jobs``, else the process's threads (``OMP_NUM_THREADS``, which ``--threads`` and Snakemake
    set, else the usable cores), at most 8."""
    if n_jobs is not None:
        return max(1, int(n_jobs))
    from ..threads import default_threads

    return max(1, min(default_threads(), 8))


def _row_blocks(indptr: np.ndarray, block: int = BLOCK) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` holding about ``block`` stored values each (a long row is one block)."""
    n_rows = len(indptr) - 1
    nnz = int(indptr[-1])
    if n_rows <= 0:
        return []
    cuts = np.searchsorted(indptr, np.arange(0, max(nnz, 1), block), side="right") - 1
    cuts = np.unique(np.r_[0, np.clip(cuts, 0, n_rows), n_rows])
    return list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))


def _for_blocks(fn, spans, n_jobs: int | None):
    """Run ``fn(r0, r1)`` over row blocks; numpy releases the GIL in sorts and ufuncs, so threads
    scale. Returns the results in block order (exceptions propagate)."""
    n = _threads(n_jobs)
    if n == 1 or len(spans) < 2:
        return [fn(r0, r1) for r0, r1 in spans]
    with ThreadPoolExecutor(max_workers=min(n, len(spans))) as pool:
        return list(pool.map(lambda span: fn(*span), spans))


def _row_ids(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))


def binarize(counts) -> sp.csr_matrix:
    """0/1 float32 CSR copy of a count matrix: accessible (count > 0) or not. Stored zeros are dropped
    first, so an explicit 0 stays 0 (setting the data to 1 first would turn it into a 1)."""
    x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    x.eliminate_zeros()
    x.data[:] = 1.0
    return x


def document_frequency(counts, n_cells: int | None = None) -> np.ndarray:
    """Fraction of cells in which each cCRE is accessible (count > 0).

    ``n_cells`` defaults to the number of rows; pass the corpus total when summing over shards.
    """
    counts = _as_csr(counts)
    nz = np.bincount(counts.indices[counts.data > 0], minlength=counts.shape[1]).astype(np.float64)
    total = counts.shape[0] if n_cells is None else n_cells
    return nz / max(total, 1)


def global_tfidf(counts, df, *, n_jobs: int | None = None) -> sp.csr_matrix:
    """Global TF-IDF of a cells x cCREs count matrix (SPEC §2).

    ``v_ij = log1p(1e4 * X_ij / sum_k X_ik / df_j)``; zeros stay zeros. The arithmetic follows the
    authors' dtypes (row sums and their inverses in float32, then float64 from the division by
    ``df``), so the values are bit-identical to their ``global_TFIDF``. Returns a float64 CSR matrix
    with sorted indices and the sparsity pattern of the non-zero counts. Works block by block on
    ``n_jobs`` threads (default: the process's threads, at most 8).
    """
    counts = _canonical_csr(counts)
    df = np.asarray(df, dtype=np.float64).ravel()
    if df.shape[0] != counts.shape[1]:
        raise InputFormatError(
            f"document frequency has {df.shape[0]} entries but the matrix has {counts.shape[1]} cCREs",
            field="df", fix="use the document frequencies of the same cCRE vocabulary")
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_df = 1.0 / df
    rs = np.asarray(counts.sum(axis=1, dtype=np.float32)).ravel().astype(np.float32)
    with np.errstate(divide="ignore"):
        inv_rs = (np.float32(1.0) / rs).astype(np.float32)
    from . import _kernels as K

    indptr = counts.indptr
    data, indices = counts.data, counts.indices
    if data.dtype not in _KERNEL_DTYPES:  # the first operation is a cast to float32 anyway
        data = data.astype(np.float32)
    if indices.dtype not in (np.int32, np.int64):
        indices = indices.astype(np.int64)
    val = np.empty(counts.nnz, dtype=np.float64)
    OK, BAD_COUNTS, ZEROS, BAD_DF = 0, 1, 2, 3
    # 1/df is checked per stored value only when some entry is bad (a cCRE absent from the corpus
    # has df = 0, which is fine as long as no cell has it)
    check_df = not bool(((inv_df > 0) & (inv_df < np.inf)).all())

    def work(r0: int, r1: int) -> int:
        s, e = int(indptr[r0]), int(indptr[r1])
        if e == s:
            return OK
        x = data[s:e]
        lo, hi = x.min(), x.max()  # NaN propagates into both
        if not (lo >= 0 and hi < np.inf):
            return BAD_COUNTS
        if lo == 0:
            return ZEROS
        # one compiled pass, the authors' arithmetic and dtypes: float32 row scaling, then float64
        # from 1/df, times 1e4
        K.tfidf_block(data, indices, indptr, r0, r1, inv_rs, inv_df, val)
        v = val[s:e]
        if check_df and not (v.min() > 0 and v.max() < np.inf):  # NaN fails both
            return BAD_DF
        np.log1p(v, out=v)
        return OK

    status = set(_for_blocks(work, _row_blocks(indptr), n_jobs))
    if BAD_COUNTS in status:
        _check_counts(counts.data)  # raises with the message
    if ZEROS in status:  # explicit zeros stored: drop them and start again (rare)
        counts = counts.copy()
        counts.eliminate_zeros()
        return global_tfidf(counts, df, n_jobs=n_jobs)
    if BAD_DF in status:
        g = inv_df[counts.indices]
        bad = np.flatnonzero(~((g > 0) & (g < np.inf)))
        j = int(counts.indices[bad[0]])
        raise InputFormatError(
            f"document frequency is zero, negative or NaN for cCRE {j} (df={df[j]!r}), which has "
            f"counts ({len(np.unique(counts.indices[bad]))} such cCREs)",
            field="df", fix="compute df over a corpus that contains these cells")
    out = sp.csr_matrix((val, counts.indices.copy(), indptr.copy()), shape=counts.shape)
    out.has_sorted_indices = True
    return out


def cell_sentences(tfidf, max_len: int | None = None, *, return_values: bool = False,
                   n_jobs: int | None = None):
    """Rank-ordered cell sentences from a TF-IDF CSR matrix.

    Returns ``(indptr, tokens)`` (and ``values``, the TF-IDF in the same order, if ``return_values``):
    cell ``i`` is ``tokens[indptr[i]:indptr[i+1]]``, token ids = cCRE index + 4, sorted by TF-IDF
    descending with ties by ascending cCRE index. ``max_len`` keeps the top ``max_len`` tokens
    (the inference rule of the authors). Works block by block on ``n_jobs`` threads (default: the
    process's threads, at most 8); the result does not depend on ``n_jobs``.
    """
    tf = tfidf if sp.issparse(tfidf) and tfidf.format == "csr" else sp.csr_matrix(tfidf)
    if not tf.has_sorted_indices:
        tf = tf.copy()
        tf.sort_indices()
    indptr = tf.indptr.astype(np.int64)
    data, cols = tf.data, tf.indices
    try:
        tokens, values = _rank_order(indptr, data, cols, n_jobs=n_jobs, with_values=return_values)
    except _ZeroValues:  # explicit zeros stored (rare): drop them first
        tf = tf.copy()
        tf.eliminate_zeros()
        indptr = tf.indptr.astype(np.int64)
        tokens, values = _rank_order(indptr, tf.data, tf.indices, n_jobs=n_jobs,
                                     with_values=return_values)
    if max_len is not None:
        if return_values:
            indptr, (tokens, values) = truncate_sentences(indptr, tokens, max_len, values)
        else:
            indptr, tokens = truncate_sentences(indptr, tokens, max_len)
    if return_values:
        return indptr, tokens, values
    return indptr, tokens


class _ZeroValues(Exception):
    """A block holds explicit zeros, which are not tokens."""


_MASK63 = np.uint64(0x7FFF_FFFF_FFFF_FFFF)


def _rank_order(indptr: np.ndarray, data: np.ndarray, cols: np.ndarray | None = None, *,
                block: int = BLOCK, min_value_bits: int = 36, n_jobs: int | None = None,
                with_values: bool = True):
    """Sort each CSR row by value descending, ties by position (= ascending cCRE).

    ``data`` must not hold NaN. The bit pattern of a non-negative float64 is monotone in its value
    (negative values are mapped the usual way), so each row-aligned block of about ``block`` stored
    values becomes one array of unique 64-bit integer keys ``(row in block, value bits descending,
    position)`` that a plain (SIMD) sort orders. The value bits are truncated to fit, which can merge
    two values that differ only in their last bits: such a group is then in position order, not value
    order. A compiled pass unpacks the sorted keys and puts each such group in exact order (stable
    insertion sort; a vectorised exact re-sort of the groups concerned if they are huge).
    Everything happens block by block, in cache and on ``n_jobs`` threads; the loop runs over
    blocks, not cells.

    Returns ``(order, data[order])``, or ``(cols[order] + NUM_SPECIAL, data[order])`` (token ids,
    int64) when ``cols`` is given; the second item is None when ``with_values`` is False. Raises
    ``InputFormatError`` on NaN and ``_ZeroValues`` when a stored value is zero (the caller drops
    those first).
    """
    data = np.ascontiguousarray(data, dtype=np.float64)
    nnz = len(data)
    first = np.empty(nnz, dtype=np.int64)
    values = np.empty(nnz, dtype=np.float64) if with_values else None
    if nnz == 0:
        return first, values
    indptr = np.asarray(indptr, dtype=np.int64)
    lens = np.diff(indptr)
    bits_all = data.view(np.uint64)
    from . import _kernels as K

    def work(r0: int, r1: int) -> None:
        s, e = int(indptr[r0]), int(indptr[r1])
        if e == s:
            return
        d = data[s:e]
        lo = d.min()
        if np.isnan(lo):  # NaN propagates into the minimum
            raise InputFormatError("TF-IDF matrix has NaN values",
                                   fix="tokenize the output of global_tfidf on clean counts")
        if not lo > 0 and not (d != 0).all():
            raise _ZeroValues()
        nbits = max(e - s - 1, 1).bit_length()
        rbits = max(r1 - r0 - 1, 1).bit_length()
        qbits = 64 - nbits - rbits
        ids = first[s:e]

        def put_ids(o):  # ids of the positions o in the block: token ids, or positions in data
            if cols is None:
                np.add(o, s, out=ids)
            else:
                np.add(cols[s:e][o], NUM_SPECIAL, out=ids)

        if qbits < min_value_bits:  # one enormous row: exact lexsort of the block
            o = np.lexsort((-d, np.repeat(np.arange(r1 - r0), lens[r0:r1])))
            if values is not None:
                values[s:e] = d[o]
            put_ids(o)
            return
        if lo > 0:  # the usual case (TF-IDF values are positive): one compiled pass
            key = np.empty(e - s, dtype=np.uint64)
            K.build_keys(bits_all, indptr, r0, r1, np.uint64(63 - qbits), np.uint64(nbits),
                         np.uint64(qbits + nbits), key)
        else:  # IEEE order: negatives have all bits flipped, positives the sign bit set
            bits = d.view(np.uint64)
            key = np.where(bits >> np.uint64(63), bits, ~bits & _MASK63)  # = ~(ascending key)
            key >>= np.uint64(64 - qbits)
            key <<= np.uint64(nbits)
            key |= np.arange(e - s, dtype=np.uint64)
            if r1 - r0 > 1:
                key |= np.repeat(np.arange(r1 - r0, dtype=np.uint64) << np.uint64(qbits + nbits),
                                 lens[r0:r1])
        key.sort()
        o = np.empty(e - s, dtype=np.int64)
        sv = values[s:e] if values is not None else np.empty(e - s)
        c = cols[s:e] if cols is not None else _NO_COLS
        base = NUM_SPECIAL if cols is not None else s
        if not K.unpack_sorted(key, np.uint64(nbits), d, c, cols is not None, base, o, sv, ids):
            # values a few ulps apart in very large key groups: exact re-sort of those groups
            np.bitwise_and(key, np.uint64((1 << nbits) - 1), out=o.view(np.uint64))
            np.take(d, o, out=sv)
            _repair_groups(key, nbits, o, sv)
            put_ids(o)

    _for_blocks(work, _row_blocks(indptr, block), n_jobs)
    return first, values


def _repair_groups(key: np.ndarray, nbits: int, o: np.ndarray, sv: np.ndarray) -> None:
    """Re-sort exactly, in place, the key groups of a sorted block in which a value increases.

    ``key`` are the sorted keys (``(row | truncated value) << nbits | position``), ``o`` the positions
    and ``sv`` the values in key order. Only the groups with an increase are touched; within them the
    sort is stable, so equal values keep ascending cCRE order."""
    n = len(key)
    hi = key >> np.uint64(nbits)
    group_start = np.empty(n, dtype=bool)  # first element of a (row, truncated value) group
    group_start[0] = True
    np.not_equal(hi[1:], hi[:-1], out=group_start[1:])
    viol = np.flatnonzero(sv[1:] > sv[:-1]) + 1
    viol = viol[~group_start[viol]]  # an increase inside a key group (never across rows/groups)
    if not viol.size:
        return
    starts = np.flatnonzero(group_start)
    bad = np.unique(np.searchsorted(starts, viol, side="right") - 1)
    glen = np.r_[starts[1:], n][bad] - starts[bad]
    gid = np.repeat(np.arange(len(bad)), glen)
    idx = np.repeat(starts[bad] - np.cumsum(glen) + glen, glen) + np.arange(int(glen.sum()))
    perm = np.lexsort((-sv[idx], gid))
    o[idx] = o[idx][perm]
    sv[idx] = sv[idx][perm]


_NO_COLS = np.empty(0, dtype=np.int64)


def _lengths(indptr):
    return np.diff(np.asarray(indptr, dtype=np.int64))


def truncate_sentences(indptr, tokens, max_len: int, *extra):
    """Keep the first ``max_len`` tokens of each sentence (top-k at inference).

    ``extra`` arrays aligned with ``tokens`` are cut the same way. Returns ``(indptr, tokens)`` or,
    with extras, ``(indptr, (tokens, *extra))``.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    lens = _lengths(indptr)
    new_lens = np.minimum(lens, max_len)
    pos = np.arange(len(tokens), dtype=np.int64) - np.repeat(indptr[:-1], lens)
    mask = pos < np.repeat(new_lens, lens)
    new_indptr = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
    if extra:
        return new_indptr, tuple(np.asarray(a)[mask] for a in (tokens, *extra))
    return new_indptr, np.asarray(tokens)[mask]


class UniformSource(Protocol):
    """``np.random.Generator``, or anything else whose ``random(n)`` gives ``n`` uniforms in [0, 1)."""

    def random(self, n: int) -> np.ndarray: ...


def subsample_sentences(indptr, tokens, max_len: int, rng: UniformSource, *extra):
    """Sample ``max_len`` tokens uniformly without replacement from every longer sentence, keeping
    their rank order (SPEC §2, training rule). Shorter sentences are unchanged. Vectorised: one random
    key per token, the ``max_len`` smallest keys of each long row are kept.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    tokens = np.asarray(tokens)
    lens = _lengths(indptr)
    if lens.size == 0 or lens.max(initial=0) <= max_len:
        if extra:
            return indptr, (tokens, *extra)
        return indptr, tokens
    rows = np.repeat(np.arange(len(lens)), lens)
    keys = rng.random(len(tokens))
    keys[np.repeat(lens <= max_len, lens)] = -1.0  # short rows keep everything
    order = np.lexsort((keys, rows))
    rank_in_row = np.empty(len(tokens), dtype=np.int64)
    rank_in_row[order] = np.arange(len(tokens)) - np.repeat(indptr[:-1], lens)
    mask = rank_in_row < max_len  # positional order within the row is preserved by boolean masking
    new_lens = np.minimum(lens, max_len)
    new_indptr = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
    if extra:
        return new_indptr, tuple(np.asarray(a)[mask] for a in (tokens, *extra))
    return new_indptr, tokens[mask]


def gather_rows(indptr, rows, *arrays):
    """The rows ``rows`` of the CSR arrays ``arrays`` (all aligned with ``indptr``), vectorised:
    ``(new_indptr, gathered)`` with ``gathered`` one array, or a tuple when several are given."""
    rows = np.asarray(rows, dtype=np.int64)
    indptr = np.asarray(indptr)
    starts = indptr[rows].astype(np.int64)
    lens = indptr[rows + 1].astype(np.int64) - starts
    ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    src = np.repeat(starts, lens) + (np.arange(int(ptr[-1]), dtype=np.int64) - np.repeat(ptr[:-1], lens))
    out = tuple(np.asarray(a)[src] for a in arrays)
    return ptr, (out[0] if len(out) == 1 else out)


def build_input_ids(indptr, tokens, rows=None, pad_to: int | None = None):
    """Model input ``[CLS] + sentence + [SEP]``, right-padded with PAD, for the selected rows.

    Returns a ``LongTensor``-ready int64 numpy array ``[B, L]`` with ``L = max length + 2``
    (or ``pad_to``).
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    if rows is None:
        rows = np.arange(len(indptr) - 1)
    rows = np.asarray(rows, dtype=np.int64)
    starts, ends = indptr[rows], indptr[rows + 1]
    lens = ends - starts
    width = int(lens.max(initial=0)) + 2 if pad_to is None else int(pad_to)
    out = np.zeros((len(rows), width), dtype=np.int64)
    out[:, 0] = CLS
    total = int(lens.sum())
    if total:
        r = np.repeat(np.arange(len(rows)), lens)
        offs = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        src = np.repeat(starts, lens) + offs
        out[r, offs + 1] = np.asarray(tokens)[src]
    out[np.arange(len(rows)), lens + 1] = SEP
    return out
