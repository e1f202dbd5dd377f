"""Batch-integration metrics on known cases: perfectly mixed vs perfectly separated batches."""

import numpy as np
import pytest

from epiflow.metrics.integration import (batch_asw, graph_connectivity, ilisi, integration_scores, kbet,
                                         kbet_test, knn, lisi)


def _data(separated: bool, n_per=60, seed=0):
    """3 well separated cell types x 2 batches; batch 1 shifted far away when ``separated``."""
    rng = np.random.default_rng(seed)
    xs, b, t = [], [], []
    for ti in range(3):
        for bi in range(2):
            centre = np.zeros(5)
            centre[ti] = 20.0
            if separated and bi == 1:
                centre[4] = 50.0
            xs.append(centre + rng.normal(size=(n_per, 5)))
            b += [f"b{bi}"] * n_per
            t += [f"t{ti}"] * n_per
    return np.vstack(xs), np.array(b), np.array(t)


def test_mixed_batches_score_high():
    x, b, t = _data(False)
    s = integration_scores(x, b, t, k_lisi=30, k_kbet=20)
    assert s["iLISI"] > 0.7
    assert s["kBET"] > 0.7
    assert s["kBET_global"] > 0.7
    assert s["graph_connectivity"] == pytest.approx(1.0)
    assert s["batch_ASW"] > 0.9


def test_separated_batches_score_low():
    x, b, t = _data(True)
    s = integration_scores(x, b, t, k_lisi=30, k_kbet=20)
    assert s["iLISI"] == pytest.approx(0.0, abs=1e-6)
    assert s["kBET"] == pytest.approx(0.0)
    assert s["kBET_global"] == pytest.approx(0.0)
    # each type splits into its two equal batches: largest component = half of the type
    assert s["graph_connectivity"] == pytest.approx(0.5)
    assert s["batch_ASW"] < 0.1


def test_lisi_bounds_and_exact_two_cluster_case():
    # two tight clusters, each holding both labels in equal numbers: LISI = 2 (inverse Simpson of 50/50)
    rng = np.random.default_rng(1)
    x = np.vstack([rng.normal(size=(40, 2)) * 1e-3, 100 + rng.normal(size=(40, 2)) * 1e-3])
    lab = np.tile(["a", "b"], 40)
    v = lisi(x, lab, k=39, perplexity=13)
    assert np.all((v >= 1.0 - 1e-9) & (v <= 2.0 + 1e-9))
    assert np.median(v) > 1.8
    assert ilisi(x, lab, k=39) > 0.8


def test_kbet_chi_square_known_values():
    # 4 cells with 4 neighbours each; global batch freq 1/2: counts (2,2) -> stat 0, (4,0) -> stat 4
    nb = np.array([[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]])
    stat, p = kbet_test(nb, np.array([0, 0, 1, 1]), 2)
    assert stat.tolist() == pytest.approx([0.0, 4.0, 4.0, 0.0])
    assert p[0] == pytest.approx(1.0)
    assert p[1] == pytest.approx(0.0455, abs=1e-3)  # chi2(1).sf(4)


def test_knn_excludes_self():
    x = np.arange(10, dtype=float)[:, None]
    d, i = knn(x, 2)
    assert not (i == np.arange(10)[:, None]).any()
    assert d[5].tolist() == [1.0, 1.0]


def test_single_batch_is_an_error():
    from epiflow.errors import EpiflowError

    x, b, t = _data(False)
    with pytest.raises(EpiflowError):
        kbet(x, np.zeros(len(x)))
    assert np.isnan(batch_asw(x, np.zeros(len(x)), t))
    assert graph_connectivity(x, t) == pytest.approx(1.0)


def test_matches_scib_metrics():
    scib = pytest.importorskip("scib_metrics")
    from scib_metrics.nearest_neighbors import NeighborsResults

    x, b, _ = _data(False, n_per=30)
    b = b.copy()
    b[::7] = "b2"  # unequal, three batches
    k = 30
    d, i = knn(x, k, include_self=True)
    nr = NeighborsResults(indices=i, distances=d)
    ref = float(scib.ilisi_knn(nr, b, perplexity=float(np.floor(k / 3))))
    ours = ilisi(x, b, k=k - 1, perplexity=float(np.floor(k / 3)))
    assert ours == pytest.approx(ref, abs=1e-3)
    acc, stat, p = scib.kbet(nr, b)
    codes = np.unique(b, return_inverse=True)[1]
    s2, p2 = kbet_test(codes[i], codes, 3)
    assert np.allclose(np.asarray(stat), s2, atol=1e-3)
    assert float(acc) == pytest.approx(float((p2 >= 0.05).mean()))
    # batch ASW: the same number; graph connectivity: scIB's definition (components of the symmetrised
    # kNN graph), where scib-metrics takes the strongly connected components of the directed kNN graph,
    # which are never larger (here 1.0 against ~0.99 on mixed batches; equal on separated ones)
    for separated in (False, True):
        x, b, t = _data(separated, n_per=40, seed=1)
        b = b.copy()
        b[::7] = "b2"
        assert batch_asw(x, b, t) == pytest.approx(float(scib.silhouette_batch(x, t, b)), abs=1e-6)
        d, i = knn(x, 15, include_self=True)
        ref = float(scib.graph_connectivity(NeighborsResults(indices=i, distances=d), t))
        ours = graph_connectivity(x, t, k=14)
        assert ref <= ours <= ref + 0.05
        assert (ours == pytest.approx(ref)) is separated


def test_one_knn_for_all_metrics_gives_each_metrics_own_numbers():
    # integration_scores computes the kNN once (largest k) and slices it: the same values as each
    # metric's own query, also when k is clipped to n - 1
    for n_per, ks in ((60, dict(k_lisi=30, k_kbet=20, k_graph=15)), (60, {}), (8, dict(k_lisi=90, k_kbet=50))):
        x, b, t = _data(False, n_per=n_per, seed=3)
        b = b.copy()
        b[::5] = "b2"
        k_lisi, k_kbet, k_graph = ks.get("k_lisi", 90), ks.get("k_kbet", 50), ks.get("k_graph", 15)
        ref = {"iLISI": ilisi(x, b, k=k_lisi), "kBET_global": kbet(x, b, k=k_kbet),
               "kBET": kbet(x, b, t), "graph_connectivity": graph_connectivity(x, t, k=k_graph),
               "batch_ASW": batch_asw(x, b, t)}
        assert integration_scores(x, b, t, **ks) == ref
        assert integration_scores(x, b, **ks) == {k: ref[k] for k in ("iLISI", "kBET_global")}
    d, i = knn(x, 5)
    assert np.array_equal(knn(x, 3)[1], i[:, :3])
    from epiflow.errors import EpiflowError

    with pytest.raises(EpiflowError, match="precomputed neighbours"):
        graph_connectivity(x, t, k=8, neighbours=(d, i))


def test_batch_asw_subsamples_only_types_over_the_cap():
    from sklearn.metrics import silhouette_samples

    x, b, t = _data(False, n_per=40, seed=2)
    b = b.copy()
    b[::7] = "b2"
    full = batch_asw(x, b, t, sample_size=None)
    assert batch_asw(x, b, t) == full and batch_asw(x, b, t, sample_size=80) == full  # types of 80 cells
    capped = batch_asw(x, b, t, sample_size=50, seed=4)
    assert capped == batch_asw(x, b, t, sample_size=50, seed=4) and capped != full
    want = []
    for ty in np.unique(t):
        m = np.sort(np.random.default_rng(4).choice(np.flatnonzero(t == ty), 50, replace=False))
        want.append(np.mean(1.0 - np.abs(silhouette_samples(x[m], b[m]))))
    assert capped == pytest.approx(float(np.mean(want)), abs=0)


def test_headline_kbet_is_scibs_per_cell_type():
    """Two batches each perfectly mixed within every cell type but with different type proportions:
    scIB's kBET (within each type, averaged; the headline `kBET`) is high, the global test (every cell
    against the overall batch frequencies) is low, because it counts the type mix as a batch effect."""
    rng = np.random.default_rng(0)
    xs, b, t = [], [], []
    for ti, (n_b0, n_b1) in enumerate(((150, 30), (30, 150))):  # type A mostly b0, type B mostly b1
        centre = np.eye(5)[ti] * 30
        for bi, n in ((0, n_b0), (1, n_b1)):
            xs.append(centre + rng.normal(size=(n, 5)))
            b += [f"b{bi}"] * n
            t += [f"t{ti}"] * n
    s = integration_scores(np.vstack(xs), np.array(b), np.array(t), k_lisi=30, k_kbet=20)
    assert s["kBET"] > 0.8 and s["kBET_global"] < 0.2, s
