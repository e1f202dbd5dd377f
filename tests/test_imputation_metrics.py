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
