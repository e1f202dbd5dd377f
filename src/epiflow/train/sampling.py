"""Vectorised samplers for the pretraining objectives (no per-cell Python loops).

* :func:`sample_complement` draws, for every cell of a batch, ``k_i`` distinct cCREs that are NOT
  accessible in the cell (CCA negatives, RLM replacement tokens). Sampling is done in "complement
  rank space" ``[0, N - n_pos_i)`` and mapped back to cCRE indices with one ``searchsorted`` over the
  whole batch, so negatives are disjoint from the positives by construction and unique within the
  cell. Distinct ranks are drawn by vectorised rejection rounds over the whole batch (draw with
  replacement, keep first occurrences in draw order, which gives a uniform random k-subset); rows
  that need more than half of their complement draw the excluded set instead.
* :func:`rlm_replace` replaces 50 % of each sentence's tokens by inaccessible cCREs.

All randomness comes from :mod:`epiflow.train.rng` keyed by cell, so results do not depend on how
a batch is split.
"""

from __future__ import annotations

import numpy as np

from ..tokenize import NUM_SPECIAL
from . import rng as krng


def _row_ids(lengths) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


def _offsets(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)


def distinct_ranks(keys, m, k, *, oversample: float = 1.15, max_rounds: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``k[i]`` distinct integers uniformly from ``[0, m[i])`` per row (requires ``k <= m``).

    Returns ``(indptr, values)`` with the values of each row in (random) draw order.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    m = np.asarray(m, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    if np.any(k > m) or np.any(k < 0):
        raise ValueError("distinct_ranks needs 0 <= k <= m")
    nrows = len(k)
    # rows needing more than half of their range draw the excluded set (size m - k) instead
    flip = k * 2 > m
    want = np.where(flip, m - k, k)
    rows_all = np.empty(0, dtype=np.int64)
    vals_all = np.empty(0, dtype=np.int64)
    order_all = np.empty(0, dtype=np.int64)
    drawn = np.zeros(nrows, dtype=np.int64)  # counters used so far per row
    have = np.zeros(nrows, dtype=np.int64)
    for _ in range(max_rounds):
        need = want - have
        active = need > 0
        if not active.any():
            break
        n_draw = np.where(active, np.ceil(need * oversample).astype(np.int64) + 4, 0)
        r = _row_ids(n_draw)
        ctr = np.arange(len(r), dtype=np.int64) - np.repeat(_offsets(n_draw)[:-1], n_draw) + np.repeat(drawn, n_draw)
        u = krng.uniform(keys[r], ctr.astype(np.uint64))
        v = np.minimum((u * m[r]).astype(np.int64), m[r] - 1)
        drawn += n_draw
        rows_all = np.concatenate([rows_all, r])
        vals_all = np.concatenate([vals_all, v])
        order_all = np.concatenate([order_all, ctr])
        # first occurrence of every (row, value) in draw order
        srt = np.lexsort((order_all, vals_all, rows_all))
        rs, vs = rows_all[srt], vals_all[srt]
        first = np.ones(len(srt), dtype=bool)
        first[1:] = (rs[1:] != rs[:-1]) | (vs[1:] != vs[:-1])
        keep = srt[first]
        rows_all, vals_all, order_all = rows_all[keep], vals_all[keep], order_all[keep]
        have = np.bincount(rows_all, minlength=nrows)
    else:  # pragma: no cover - astronomically unlikely
        raise RuntimeError("distinct_ranks did not converge")
    # keep the first `want` uniques of each row in draw order
    srt = np.lexsort((order_all, rows_all))
    rows_all, vals_all = rows_all[srt], vals_all[srt]
    cnt = np.bincount(rows_all, minlength=nrows)
    rank = np.arange(len(rows_all)) - np.repeat(_offsets(cnt)[:-1], cnt)
    sel = rank < want[rows_all]
    rows_sel, vals_sel = rows_all[sel], vals_all[sel]
    if not flip.any():
        return _offsets(k), vals_sel
    # flipped rows: complement of the excluded set within [0, m)
    keep_rows = ~flip[rows_sel]
    out_rows = [rows_sel[keep_rows]]
    out_vals = [vals_sel[keep_rows]]
    fr = np.flatnonzero(flip)
    full_r = _row_ids(m[fr])
    full_v = np.arange(len(full_r), dtype=np.int64) - np.repeat(_offsets(m[fr])[:-1], m[fr])
    full_row = fr[full_r]
    excl = np.zeros(len(full_r), dtype=bool)
    ex_rows = rows_sel[~keep_rows]
    ex_vals = vals_sel[~keep_rows]
    if len(ex_rows):
        where = np.full(nrows, -1, dtype=np.int64)
        where[fr] = np.arange(len(fr))
        excl[_offsets(m[fr])[:-1][where[ex_rows]] + ex_vals] = True
    out_rows.append(full_row[~excl])
    # shuffle the kept complement with the row's own stream so the order is random as well
    kept_v = full_v[~excl]
    kept_r = full_row[~excl]
    u = krng.uniform(keys[kept_r] ^ np.uint64(0x5DEECE66D), kept_v.astype(np.uint64))
    out_vals.append(kept_v)
    rows_cat = np.concatenate(out_rows)
    vals_cat = np.concatenate(out_vals)
    tie = np.concatenate([np.arange(int(keep_rows.sum()), dtype=np.float64), u])  # rows are either kind
    srt = np.lexsort((tie, rows_cat))
    return _offsets(k), vals_cat[srt]


def sample_complement(keys, pos_indptr, pos_ccres, n_ccres: int, k) -> tuple[np.ndarray, np.ndarray]:
    """For every row, ``min(k_i, N - n_pos_i)`` distinct cCRE indices (0-based) not in its positives.

    ``pos_indptr``/``pos_ccres``: CSR of each row's accessible cCREs (0-based, unique per row, any
    order). Returns ``(indptr, ccres)``.
    """
    pos_indptr = np.asarray(pos_indptr, dtype=np.int64)
    pos_ccres = np.asarray(pos_ccres, dtype=np.int64)
    npos = np.diff(pos_indptr)
    m = n_ccres - npos
    k = np.minimum(np.asarray(k, dtype=np.int64), m)
    k = np.maximum(k, 0)
    indptr, ranks = distinct_ranks(keys, m, k)
    if len(ranks) == 0:
        return indptr, ranks
    # map complement rank r of row i to its cCRE: r + #{positives p_j of row i with p_j - j <= r}
    prow = _row_ids(npos)
    order = np.lexsort((pos_ccres, prow))
    p_sorted = pos_ccres[order]
    adjusted = p_sorted - (np.arange(len(p_sorted)) - np.repeat(_offsets(npos)[:-1], npos))
    stride = np.int64(n_ccres + 1)
    hay = prow * stride + adjusted
    qrow = _row_ids(np.diff(indptr))
    cnt = np.searchsorted(hay, qrow * stride + ranks, side="right") - _offsets(npos)[:-1][qrow]
    return indptr, ranks + cnt


def rlm_replace(keys_pos, keys_tok, input_indptr, input_tokens, pos_indptr, pos_ccres, n_ccres: int,
                fraction: float = 0.5):
    """Replace ``round(fraction * L_i)`` tokens of each input sentence by inaccessible cCREs.

    ``input_tokens``: token ids (cCRE + 4) of each cell's model input (after the cap), CSR.
    ``pos_*``: ALL accessible cCREs of each cell (0-based), so replacements are truly inaccessible,
    distinct within the cell. Returns ``(new_tokens, labels)`` aligned with ``input_tokens``:
    label 1 = original accessible token, 0 = replaced.
    """
    input_indptr = np.asarray(input_indptr, dtype=np.int64)
    lens = np.diff(input_indptr)
    n_rep = np.rint(lens * fraction).astype(np.int64)
    # choose positions: the n_rep smallest keys of each row
    u = krng.per_element_uniform(keys_pos, lens)
    rows = _row_ids(lens)
    order = np.lexsort((u, rows))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(input_indptr[:-1], lens)
    rep_indptr, repl = sample_complement(keys_tok, pos_indptr, pos_ccres, n_ccres, n_rep)
    got = np.diff(rep_indptr)  # may be smaller than n_rep if the complement is tiny
    chosen = rank < got[rows]
    new_tokens = np.asarray(input_tokens, dtype=np.int64).copy()
    # the chosen positions of row i, in row-major order, receive row i's got[i] replacement tokens
    new_tokens[np.flatnonzero(chosen)] = repl + NUM_SPECIAL
    labels = (~chosen).astype(np.float32)
    return new_tokens, labels


def sample_complement_weighted(keys, pos_indptr, pos_ccres, n_ccres: int, k, weights,
                               *, oversample: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`sample_complement` but cCRE ``j`` is drawn with probability proportional to
    ``weights[j]`` (e.g. its document frequency: popularity-matched CCA negatives, an option of
    issue #15; the paper samples uniformly).

    Successive sampling, vectorised over the batch: each row draws ``ceil(oversample * k_i) + 8``
    candidates with replacement from the weight distribution (inverse CDF), positives and repeats are
    dropped, and the first ``k_i`` distinct ones in draw order are kept (a weighted sample without
    replacement). Rows left short (a tiny or exhausted complement) are filled with uniform draws from
    the rest of their complement, so every row still gets ``min(k_i, N - n_pos_i)`` distinct negatives.
    Zero-weight cCREs are only ever drawn by that fill.
    """
    pos_indptr = np.asarray(pos_indptr, dtype=np.int64)
    pos_ccres = np.asarray(pos_ccres, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.uint64)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.shape[0] != n_ccres or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be n_ccres finite non-negative values with a positive sum")
    npos = np.diff(pos_indptr)
    nrows = len(npos)
    want = np.maximum(np.minimum(np.asarray(k, dtype=np.int64), n_ccres - npos), 0)
    n_draw = np.where(want > 0, np.ceil(want * oversample).astype(np.int64) + 8, 0)
    r = _row_ids(n_draw)
    ctr = np.arange(len(r), dtype=np.int64) - np.repeat(_offsets(n_draw)[:-1], n_draw)
    u = krng.uniform(keys[r] ^ np.uint64(0xA5A5A5A5), ctr.astype(np.uint64))
    cdf = np.cumsum(w)
    cand = np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), n_ccres - 1)
    stride = np.int64(n_ccres)
    is_pos = np.isin(r * stride + cand, _row_ids(npos) * stride + pos_ccres)
    # first occurrence of each (row, cCRE) in draw order, positives removed
    order = np.lexsort((ctr, cand, r))
    rs, cs = r[order], cand[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (rs[1:] != rs[:-1]) | (cs[1:] != cs[:-1])
    keep = order[first]
    keep = keep[~is_pos[keep]]
    keep = keep[np.lexsort((ctr[keep], r[keep]))]  # back to draw order within rows
    cnt = np.bincount(r[keep], minlength=nrows)
    rank = np.arange(len(keep)) - np.repeat(_offsets(cnt)[:-1], cnt)
    keep = keep[rank < want[r[keep]]]
    got_r, got_c = r[keep], cand[keep]
    short = want - np.bincount(got_r, minlength=nrows)
    if short.any():  # fill uniformly from the complement of positives + what was drawn
        ex_r = np.concatenate([_row_ids(npos), got_r])
        ex_c = np.concatenate([pos_ccres, got_c])
        o = np.lexsort((ex_c, ex_r))
        ex_ptr = _offsets(np.bincount(ex_r, minlength=nrows))
        _, fill = sample_complement(keys, ex_ptr, ex_c[o], n_ccres, short)
        got_r = np.concatenate([got_r, _row_ids(short)])
        got_c = np.concatenate([got_c, fill])
    o = np.argsort(got_r, kind="stable")
    return _offsets(want), got_c[o]
