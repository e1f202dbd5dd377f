"""Global TF-IDF and cell sentences, fully vectorised (no per-cell Python loops).

Token ids follow the authors' convention: PAD = 0, CLS = 1, SEP = 2, 3 reserved (mask), and cCRE ``j``
(0-based column of the cell-by-cCRE matrix) is token ``j + 4``.

Sentences are stored CSR-like: ``tokens[indptr[i]:indptr[i+1]]`` are the token ids of cell ``i`` in
descending TF-IDF order. Ties are broken by ascending cCRE index (deterministic; the authors'
``np.argsort(-v)`` leaves ties in an unspecified order).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import InputFormatError

PAD, CLS, SEP, MASK = 0, 1, 2, 3
NUM_SPECIAL = 4


def _as_csr(counts, name: str = "counts") -> sp.csr_matrix:
    if not sp.issparse(counts):
        counts = sp.csr_matrix(np.asarray(counts))
    counts = sp.csr_matrix(counts)
    if not counts.has_canonical_format:
        counts = counts.copy()
        counts.sum_duplicates()
    data = counts.data
    if data.size and not np.all(np.isfinite(data)):
        raise InputFormatError(f"{name} contains NaN or infinite values",
                               fix="clean the count matrix before tokenization")
    if data.size and data.min() < 0:
        raise InputFormatError(f"{name} contains negative values (min {data.min()})",
                               fix="counts must be non-negative raw counts")
    return counts


def _row_ids(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))


def document_frequency(counts, n_cells: int | None = None) -> np.ndarray:
    """Fraction of cells in which each cCRE is accessible (count > 0).

    ``n_cells`` defaults to the number of rows; pass the corpus total when summing over shards.
    """
    counts = _as_csr(counts)
    nz = np.bincount(counts.indices[counts.data > 0], minlength=counts.shape[1]).astype(np.float64)
    total = counts.shape[0] if n_cells is None else n_cells
    return nz / max(total, 1)


def global_tfidf(counts, df) -> sp.csr_matrix:
    """Global TF-IDF of a cells x cCREs count matrix (SPEC §2).

    ``v_ij = log1p(1e4 * X_ij / sum_k X_ik / df_j)``; zeros stay zeros. The arithmetic follows the
    authors' dtypes (row sums and their inverses in float32, then float64 from the division by
    ``df``), so the values are bit-identical to their ``global_TFIDF``. Returns a float64 CSR matrix
    with sorted indices and the sparsity pattern of the non-zero counts.
    """
    counts = _as_csr(counts)
    df = np.asarray(df, dtype=np.float64).ravel()
    if df.shape[0] != counts.shape[1]:
        raise InputFormatError(
            f"document frequency has {df.shape[0]} entries but the matrix has {counts.shape[1]} cCREs",
            field="df", fix="use the document frequencies of the same cCRE vocabulary")
    if counts.nnz and counts.data.min() == 0:
        counts = counts.copy()
        counts.eliminate_zeros()
    used = np.bincount(counts.indices, minlength=counts.shape[1]) > 0  # (np.unique is slow here)
    if used.any() and (not np.all(np.isfinite(df[used])) or df[used].min() <= 0):
        raise InputFormatError("document frequency is zero, negative or NaN for a cCRE that has counts",
                               field="df", fix="compute df over a corpus that contains these cells")
    rs = np.asarray(counts.sum(axis=1, dtype=np.float32)).ravel().astype(np.float32)
    with np.errstate(divide="ignore"):
        inv_rs = (np.float32(1.0) / rs).astype(np.float32)
    rows = _row_ids(counts.indptr)
    val = counts.data.astype(np.float32) * inv_rs[rows]
    with np.errstate(divide="ignore"):
        inv_df = 1.0 / df
    val = val * inv_df[counts.indices]  # float32 * float64 -> float64
    val = np.log1p(10000 * val)
    out = sp.csr_matrix((val, counts.indices.copy(), counts.indptr.copy()), shape=counts.shape)
    out.has_sorted_indices = True
    return out


def cell_sentences(tfidf, max_len: int | None = None, *, return_values: bool = False):
    """Rank-ordered cell sentences from a TF-IDF CSR matrix.

    Returns ``(indptr, tokens)`` (and ``values``, the TF-IDF in the same order, if ``return_values``):
    cell ``i`` is ``tokens[indptr[i]:indptr[i+1]]``, token ids = cCRE index + 4, sorted by TF-IDF
    descending with ties by ascending cCRE index. ``max_len`` keeps the top ``max_len`` tokens
    (the inference rule of the authors).
    """
    tf = sp.csr_matrix(tfidf)
    if not tf.has_sorted_indices:
        tf = tf.copy()
        tf.sort_indices()
    keep = tf.data != 0
    indptr = tf.indptr.astype(np.int64)
    rows = _row_ids(indptr)
    data, cols = tf.data, tf.indices
    if not keep.all():
        rows, data, cols = rows[keep], data[keep], cols[keep]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=tf.shape[0]))]).astype(np.int64)
    order = _rank_order(indptr, rows, data)
    tokens = cols[order].astype(np.int64) + NUM_SPECIAL
    values = data[order]
    if max_len is not None:
        indptr, (tokens, values) = truncate_sentences(indptr, tokens, max_len, values)
    if return_values:
        return indptr, tokens, values
    return indptr, tokens


def _rank_order(indptr: np.ndarray, rows: np.ndarray, data: np.ndarray, block: int = 8192) -> np.ndarray:
    """Permutation sorting each CSR row by value descending, ties by position (= ascending cCRE).

    A lexsort over the whole matrix is cache-unfriendly (O(nnz log nnz) over a large array), so the
    rows are processed in row-aligned blocks of about ``block`` stored values; each block is one
    vectorised lexsort. The loop runs over blocks, not cells: ``nnz / block`` iterations.
    """
    nnz = len(data)
    order = np.empty(nnz, dtype=np.int64)
    if nnz == 0:
        return order
    n_rows = len(indptr) - 1
    cuts = np.searchsorted(indptr, np.arange(0, nnz, block), side="right") - 1
    cuts = np.unique(np.r_[cuts, n_rows])
    neg = -data
    for r0, r1 in zip(cuts[:-1], cuts[1:]):
        s, e = indptr[r0], indptr[r1]
        if e > s:
            # lexsort: last key is primary; stable, so equal values keep ascending cCRE order
            order[s:e] = s + np.lexsort((neg[s:e], rows[s:e]))
    return order


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


def subsample_sentences(indptr, tokens, max_len: int, rng: np.random.Generator, *extra):
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
