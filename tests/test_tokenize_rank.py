"""The block-wise integer-key rank sort of ``cell_sentences`` against a plain lexsort reference."""

import numpy as np
import pytest
import scipy.sparse as sp

from epiflow.errors import InputFormatError
from epiflow.tokenize import cell_sentences, global_tfidf
from epiflow.tokenize.core import _rank_order, _row_ids


def _reference(indptr, data):
    return np.lexsort((-data, _row_ids(indptr)))


def _near_ties(rng, n):
    """Values that differ in their last bits: the truncated integer keys merge them."""
    base = rng.choice([1.0, 2.5, 7.119039328939031, 3.0], size=n)
    ulps = rng.integers(-3, 4, size=n) * rng.integers(0, 2, size=n)
    return base + ulps * np.spacing(base)


@pytest.mark.parametrize("block", [4, 64, 1 << 16])
@pytest.mark.parametrize("n_jobs", [1, 2])
def test_rank_order_matches_lexsort(block, n_jobs):
    rng = np.random.default_rng(block + n_jobs)
    for trial in range(60):
        lens = rng.integers(0, rng.choice([3, 50, 400]), rng.integers(1, 40))
        if trial % 10 == 0:
            lens[rng.integers(len(lens))] = rng.integers(0, 5000)
        indptr = np.r_[0, np.cumsum(lens)]
        data = rng.random(indptr[-1]) if trial % 3 == 0 else _near_ties(rng, indptr[-1])
        order, values = _rank_order(indptr, data, block=block, n_jobs=n_jobs)
        ref = _reference(indptr, data)
        np.testing.assert_array_equal(order, ref)
        np.testing.assert_array_equal(values, data[ref])


def test_rank_order_near_ties_are_exact():
    # two values one ulp apart, the smaller first: the key truncation merges them, the check repairs it
    a = 7.119039328939030
    b = np.nextafter(a, np.inf)
    data = np.array([a, b, a, 5.0, b])
    order, _ = _rank_order(np.array([0, 5]), data)
    np.testing.assert_array_equal(order, [1, 4, 0, 2, 3])


def test_rank_order_exact_fallback_and_negative_values():
    rng = np.random.default_rng(0)
    indptr = np.array([0, 300, 300, 1000])
    data = rng.normal(size=1000)
    data[rng.random(1000) < 0.3] = -1.5
    data[rng.random(1000) < 0.1] = np.inf
    for bits in (36, 64):  # 64 forces the exact lexsort path
        order, _ = _rank_order(indptr, data, min_value_bits=bits)
        np.testing.assert_array_equal(order, _reference(indptr, data))


def test_cell_sentences_drop_explicit_zeros_and_refuse_nan():
    X = sp.csr_matrix(np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]]))
    X.data[0] = 0.0  # an explicit zero is not a token
    indptr, tokens = cell_sentences(X)
    np.testing.assert_array_equal(indptr, [0, 1, 2])
    np.testing.assert_array_equal(tokens, [6, 6])
    with pytest.raises(InputFormatError, match="NaN"):
        cell_sentences(sp.csr_matrix(np.array([[1.0, np.nan]])))


def test_results_do_not_depend_on_threads():
    counts = sp.random(300, 2000, density=0.05, random_state=1, format="csr")
    counts.data = np.ceil(counts.data * 3)
    df = np.clip(np.asarray((counts > 0).mean(axis=0)).ravel(), 1e-3, None)
    one = global_tfidf(counts, df, n_jobs=1)
    two = global_tfidf(counts, df, n_jobs=2)
    assert (one != two).nnz == 0
    a = cell_sentences(one, n_jobs=1)
    b = cell_sentences(one, n_jobs=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_tfidf_errors_name_the_ccre():
    counts = sp.csr_matrix(np.array([[1.0, 2.0, 0.0]]))
    with pytest.raises(InputFormatError, match="cCRE 1"):
        global_tfidf(counts, np.array([0.5, 0.0, 0.5]))
    with pytest.raises(InputFormatError, match="negative"):
        global_tfidf(sp.csr_matrix(np.array([[1.0, -2.0]])), np.array([0.5, 0.5]))
    with pytest.raises(InputFormatError, match="NaN or infinite"):
        global_tfidf(sp.csr_matrix(np.array([[1.0, np.nan]])), np.array([0.5, 0.5]))
    # explicit zeros in the counts are dropped, not tokens
    z = sp.csr_matrix(np.array([[1.0, 2.0]]))
    z.data[0] = 0.0
    assert global_tfidf(z, np.array([0.5, 0.5])).nnz == 1


def test_huge_near_tie_group_falls_back_to_exact_sort():
    # 3,000 distinct values inside one truncated-key bucket, ascending by position: the compiled
    # insertion sort would need ~n^2/2 moves, so it gives up and the exact group re-sort runs
    n = 3000
    data = 1.0 + np.arange(n) * np.spacing(1.0)
    indptr = np.array([0, n, 2 * n])
    data = np.r_[data, data[::-1]]
    for cols in (None, np.arange(2 * n) % 7):
        order, values = _rank_order(indptr, data, cols)
        ref = _reference(indptr, data)
        expect = ref if cols is None else cols[ref] + 4
        np.testing.assert_array_equal(order, expect)
        np.testing.assert_array_equal(values, data[ref])


def _tfidf_reference(counts, df):
    """The formula with numpy, in the authors' dtypes (float32 row scaling, float64 from 1/df)."""
    counts = sp.csr_matrix(counts)
    rs = np.asarray(counts.sum(axis=1, dtype=np.float32)).ravel().astype(np.float32)
    inv_rs = (np.float32(1.0) / rs).astype(np.float32)
    tf32 = counts.data.astype(np.float32) * np.repeat(inv_rs, np.diff(counts.indptr))
    with np.errstate(divide="ignore"):
        inv_df = 1.0 / np.asarray(df, dtype=np.float64)
    return np.log1p(tf32 * inv_df[counts.indices] * 10000)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.uint8, np.float16])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_tfidf_kernel_is_bit_exact_for_every_dtype(dtype, index_dtype):
    rng = np.random.default_rng(3)
    counts = sp.random(200, 3000, density=0.03, random_state=4, format="csr")
    counts.data = rng.geometric(0.6, counts.nnz).astype(dtype)
    counts.indices = counts.indices.astype(index_dtype)
    counts.indptr = counts.indptr.astype(index_dtype)
    df = (np.bincount(counts.indices, minlength=3000) + 1) / 201
    df[rng.integers(0, 3000, 50)] = 0.0  # df = 0 is allowed where no cell has the cCRE ...
    counts = counts.tocsc()
    for j in np.flatnonzero(df == 0):
        counts.data[counts.indptr[j]:counts.indptr[j + 1]] = 0
    counts = counts.tocsr()
    counts.eliminate_zeros()
    tf = global_tfidf(counts, df, n_jobs=2)
    np.testing.assert_array_equal(tf.indices, counts.indices)
    assert tf.data.dtype == np.float64
    assert tf.data.tobytes() == _tfidf_reference(counts, df).tobytes()
    with pytest.raises(InputFormatError, match="document frequency is zero"):  # ... not elsewhere
        global_tfidf(counts, np.where(np.arange(3000) == counts.indices[0], 0.0, df))
