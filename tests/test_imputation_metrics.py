"""Imputation metrics (epiflow.metrics.imputation) on inputs with known answers."""

import numpy as np
import pytest
import scipy.sparse as sp

from epiflow.errors import EpiflowError
from epiflow.metrics.imputation import (colwise_mse, colwise_pearson, group_means, open_fraction_filter,
                                        pca_leiden_scores, rowwise_mse, rowwise_pearson, signal_agreement)


def test_open_fraction_filter_dense_and_sparse():
    x = np.zeros((100, 4))
    x[:3, 0] = 1      # 3 %  -> kept
    x[:2, 1] = 5      # 2 %  -> dropped
    x[:, 2] = 1       # 100 % -> kept
    np.testing.assert_array_equal(open_fraction_filter(x, 0.03), [True, False, True, False])
    xs = sp.csr_matrix(x)
    xs.data[xs.data == 5] = 0  # explicit zeros do not count
    np.testing.assert_array_equal(open_fraction_filter(xs, 0.02), [True, False, True, False])
    with pytest.raises(EpiflowError):
        open_fraction_filter(x, 1.5)


def test_group_means():
    x = np.array([[1.0, 0], [3, 2], [10, 10]])
    names, m = group_means(sp.csr_matrix(x), ["b", "b", "a"])
    assert names.tolist() == ["a", "b"]
    np.testing.assert_allclose(m, [[10, 10], [2, 1]])


def test_pearson_and_mse_known_values():
    a = np.array([[1.0, 2, 3], [1, 1, 1], [0, 1, 0]])
    b = np.array([[2.0, 4, 6], [1, 2, 3], [1, 0, 1]])
    r = rowwise_pearson(a, b)
    assert r[0] == pytest.approx(1.0) and np.isnan(r[1]) and r[2] == pytest.approx(-1.0)
    np.testing.assert_allclose(rowwise_mse(a, b), [(1 + 4 + 9) / 3, (0 + 1 + 4) / 3, 1.0])
    np.testing.assert_allclose(colwise_pearson(a.T, b.T), r, equal_nan=True)
    np.testing.assert_allclose(colwise_mse(a.T, b.T), rowwise_mse(a, b))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
    np.testing.assert_allclose(rowwise_pearson(x, y), [np.corrcoef(x[i], y[i])[0, 1] for i in range(5)])


def test_signal_agreement_matrix_equal_to_type_means_is_perfect():
    means = np.array([[0.0, 1, 2, 3], [3, 2, 1, 0]])
    labels = np.array(["a", "b", "a", "b", "a"])
    x = means[[0, 1, 0, 1, 0]]
    ag = signal_agreement(x, labels)
    np.testing.assert_allclose(ag["pearson_cell"], 1.0)
    np.testing.assert_allclose(ag["mse_cell"], 0.0)
    np.testing.assert_allclose(ag["pearson_ccre"], 1.0)
    # noise around the type means: lower r, MSE = noise variance against an exact reference
    rng = np.random.default_rng(1)
    noisy = x + rng.normal(0, 0.5, x.shape)
    ag2 = signal_agreement(noisy, labels, reference=x)
    assert np.all(ag2["pearson_cell"] < 1) and ag2["mse_cell"].mean() == pytest.approx(
        ((noisy - x) ** 2).mean())


def test_pca_leiden_scores_separates_blobs():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], 40)
    centers = rng.normal(0, 10, (3, 20))
    x = centers[np.repeat([0, 1, 2], 40)] + rng.normal(0, 0.5, (120, 20))
    s = pca_leiden_scores(x, y, n_pcs=10)
    assert s["NMI"] == pytest.approx(1.0) and s["ARI"] == pytest.approx(1.0) and s["leiden_reached"] == 1
    assert s["n_pcs"] == 10


def _whole_matrix_agreement(x, labels, reference):
    """signal_agreement as it was: the float64 target matrix built whole."""
    x64 = x.toarray().astype(np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    names, inv = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    ind = sp.csr_matrix((np.ones(len(inv)), (inv, np.arange(len(inv)))), shape=(len(names), len(inv)))
    sums = ind @ (reference if sp.issparse(reference) else np.asarray(reference, dtype=np.float64))
    sums = sums.toarray() if sp.issparse(sums) else sums
    target = (sums / np.bincount(inv)[:, None])[inv]
    return {"pearson_cell": rowwise_pearson(x64, target), "mse_cell": rowwise_mse(x64, target),
            "pearson_ccre": colwise_pearson(x64, target), "mse_ccre": colwise_mse(x64, target)}


@pytest.mark.parametrize("block", [1, 7, 64, 106, 159, 1 << 21])
@pytest.mark.parametrize("n_ccres", [1, 2, 29])
def test_signal_agreement_in_blocks_is_the_whole_matrix_formula_bit_for_bit(monkeypatch, block, n_ccres):
    import epiflow.metrics.imputation as M

    monkeypatch.setattr(M, "_BLOCK", block)  # blocks of 1 row / 2 columns ... one block
    rng = np.random.default_rng(3)
    x = (rng.random((53, n_ccres)) * (rng.random((53, n_ccres)) < 0.4)).astype(np.float32)
    x[5] = 0.0  # a constant row: NaN Pearson
    labels = rng.choice(["a", "b", "c"], 53)
    imputed = np.maximum(x + rng.normal(0, 0.1, x.shape).astype(np.float32), 0)
    for mat, ref in ((x, x), (imputed, x), (sp.csr_matrix(x), sp.csr_matrix(x)), (imputed.astype(np.float64), x)):
        got, want = signal_agreement(mat, labels, ref), _whole_matrix_agreement(mat, labels, ref)
        assert list(got) == list(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])  # equal, NaNs in the same places
    names, m = group_means(x, labels)
    np.testing.assert_array_equal(m, group_means(sp.csr_matrix(x), labels)[1])


def test_pca_leiden_scores_same_for_float32_and_float64_of_the_same_values():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], 30)
    x = (rng.normal(size=(90, 12)) + (np.arange(90) // 30)[:, None] * 4).astype(np.float32)
    assert pca_leiden_scores(x, y, n_pcs=5) == pca_leiden_scores(x.astype(np.float64), y, n_pcs=5)
