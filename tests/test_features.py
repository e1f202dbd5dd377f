"""LSI baseline, feature-extraction evaluation, trajectory and the evaluate-features CLI."""

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from epiflow.baselines import lsi
from epiflow.baselines.lsi import tfidf_lsi_matrix
from epiflow.errors import EpiflowError
from epiflow.metrics import clustering_scores, leiden_bisect
from epiflow.tasks.cli import write_features
from epiflow.tasks.config import FeaturesConfig
from epiflow.tasks.features import labelled_mask, run, trajectory
from epiflow.metrics.table import METRIC_COLUMNS, write_metrics

TYPES = ["T0", "T1", "T2"]


def typed_counts(n_per=50, n_feat=300, seed=0, depth=(0.5, 1.5)):
    """3 cell types, each with its own 100 open features (p 0.4) over a background (p 0.03)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per)
    p = np.full((3, n_feat), 0.03)
    for t in range(3):
        p[t, t * 100:(t + 1) * 100] = 0.4
    d = rng.uniform(*depth, size=y.size)
    x = (rng.random((y.size, n_feat)) < np.clip(d[:, None] * p[y], 0, 1)).astype(np.float32)
    x *= rng.integers(1, 3, size=x.shape)  # counts 1-2
    return sp.csr_matrix(x), y


# --------------------------------------------------------------------- LSI
def test_tfidf_known_values():
    x = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0]]))
    t = tfidf_lsi_matrix(x).toarray()
    # binarised; depth (2, 1); every feature in 1 of 2 cells -> idf = log(1 + 2/2)
    idf = math.log(2.0)
    want = np.array([[math.log1p(0.5 * idf * 1e4), 0, math.log1p(0.5 * idf * 1e4)],
                     [0, math.log1p(idf * 1e4), 0]])
    np.testing.assert_allclose(t, want, rtol=1e-6)


def test_lsi_drops_depth_component_and_separates_types():
    x, y = typed_counts()
    # the log TF-IDF (former default) has a depth first component; the default (plain) one does not here
    emb, info = lsi(x, n_components=20, return_info=True, recipe="log+us")
    assert abs(info["depth_spearman"]) > 0.9 and info["dropped_first"]
    assert emb.shape == (x.shape[0], 19) and emb.dtype == np.float32
    labels, _, reached = leiden_bisect(emb, 3, n_neighbors=10)
    assert reached
    assert clustering_scores(y, labels) == pytest.approx({"NMI": 1.0, "ARI": 1.0})
    # forced choices
    assert lsi(x, 20, drop_first=False, recipe="log+us").shape == (x.shape[0], 20)
    np.testing.assert_allclose(lsi(x, 20, drop_first=True, recipe="log+us"), emb)  # deterministic for a seed
    # the default recipe separates the types too
    labels, _, _ = leiden_bisect(lsi(x, 20), 3, n_neighbors=10)
    assert clustering_scores(y, labels)["NMI"] > 0.95


def test_lsi_keeps_first_component_without_depth_variation():
    # every cell has exactly 30 open features of its type: depth is constant, nothing to drop
    rng = np.random.default_rng(0)
    rows = []
    for t in range(3):
        for _ in range(40):
            r = np.zeros(300, np.float32)
            r[rng.choice(np.arange(t * 100, (t + 1) * 100), 30, replace=False)] = 1
            rows.append(r)
    emb, info = lsi(sp.csr_matrix(np.array(rows)), n_components=10, return_info=True)
    assert info["dropped_first"] is False and emb.shape == (120, 10)


def test_lsi_errors_and_clipping():
    x, _ = typed_counts(n_per=3, n_feat=300)
    assert lsi(x, n_components=50).shape[0] == 9  # clipped to min(n, f) - 1 = 8 components
    assert lsi(x, n_components=50, drop_first=False).shape == (9, 8)
    bad = x.tolil()
    bad[0, :] = 0
    with pytest.raises(EpiflowError, match="no accessible"):
        lsi(bad.tocsr(), 5)
    with pytest.raises(EpiflowError):
        lsi(x, 5, drop_first="sometimes")


@pytest.mark.realdata
def test_lsi_real_data_drops_depth(data_dir):
    a = ad.read_h5ad(data_dir / "buenrostro2018_bm0828.h5ad")
    emb, info = lsi(a.X, 30, return_info=True, recipe="log+us")
    assert info["dropped_first"] and abs(info["depth_spearman"]) > 0.9
    assert emb.shape == (a.n_obs, 29)


# --------------------------------------------------------------------- evaluate_features
def test_labelled_mask():
    m = labelled_mask(np.array(["A", "", None, np.nan, "nan", "NA", " B ", "None", "unknown", "Unknown"],
                               dtype=object))
    assert m.tolist() == [True, False, False, False, False, False, True, False, False, False]


def test_cells_without_a_label_are_no_cell_type(tmp_path):
    """map-dataset writes 'unknown' for a cell whose label is missing; every label-based task must
    leave those cells out rather than score them as one more cell type."""
    import anndata as ad

    from epiflow.corpus.manifest import load_manifest
    from epiflow.corpus.mapping import MISSING_LABEL, map_dataset

    rng = np.random.default_rng(0)
    n = 30
    labels = np.array(["A", "B", "C"] * 10, dtype=object)
    labels[[2, 7, 11]] = np.nan
    labels[[4]] = ""
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(0.5, (n, 20)).astype(np.float32)),
                   obs=pd.DataFrame({"ct": pd.Categorical(labels)}, index=[f"c{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(20)]))
    a.write_h5ad(tmp_path / "d.h5ad")
    (tmp_path / "m.tsv").write_text("name\tformat\tpath\tgenome\tcell_type_key\nd\th5ad\td.h5ad\thg38\tct\n")
    entry = load_manifest(tmp_path / "m.tsv")[0]
    ccres = pd.DataFrame({"chrom": "chr1", "start": np.arange(20) * 1000, "end": np.arange(20) * 1000 + 500})
    mapped, _ = map_dataset(entry, ccres, "hg38", min_frac_in_ccres=0.0)
    ct = mapped.obs["cell_type"].to_numpy(dtype=object)
    assert (ct == MISSING_LABEL).sum() == 4
    assert labelled_mask(ct).sum() == n - 4


def blob_adata(seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(TYPES, 40)
    centres = {t: np.eye(8)[i] * 50 for i, t in enumerate(TYPES)}
    good = np.stack([centres[t] for t in y]) + rng.normal(size=(y.size, 8))
    noise = rng.normal(size=(y.size, 8))
    a = ad.AnnData(obs=pd.DataFrame({"cell_type": y.astype(object), "dataset": "toy"},
                                    index=[f"c{i}" for i in range(y.size)]))
    a.obsm["X_epiagent"] = good.astype(np.float32)
    a.obsm["X_lsi"] = noise.astype(np.float32)
    return a


def test_evaluate_features_blobs(tmp_path):
    a = blob_adata()
    a.obs.iloc[:5, a.obs.columns.get_loc("cell_type")] = ""  # excluded from the metrics
    a.obs.iloc[5:7, a.obs.columns.get_loc("cell_type")] = np.nan
    out = tmp_path / "fe"
    cfg = FeaturesConfig(n_neighbors=10)
    result = run(a, cfg)
    assert not out.exists()  # run computes, the CLI side writes
    write_features(result, out, cfg)
    table = result.metrics
    assert list(table.columns) == METRIC_COLUMNS
    v = table.set_index(["method", "metric"])["value"]
    assert v["EpiAgent", "NMI"] == pytest.approx(1.0) and v["EpiAgent", "ARI"] == pytest.approx(1.0)
    assert v["EpiAgent", "leiden_reached"] == 1 and v["EpiAgent", "n_clusters"] == 3
    assert v["EpiAgent", "n_cells"] == 113 and v["EpiAgent", "n_cells_unlabelled"] == 7
    assert v["LSI", "NMI"] < 0.5  # the noise "embedding" is scored as such
    assert v["EpiAgent", "ASW_cell_type"] > 0.9 > v["LSI", "ASW_cell_type"]
    assert set(table["task"]) == {"feature_extraction"} and set(table["dataset"]) == {"toy"}
    back = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert list(back.columns) == METRIC_COLUMNS and len(back) == len(table)
    for f in ["umap.png", "umap_EpiAgent.png", "umap_LSI.png", "cells.tsv"]:
        assert (out / f).stat().st_size > 0, f
    cells = pd.read_csv(out / "cells.tsv", sep="\t")
    assert len(cells) == 113 and {"leiden_EpiAgent", "umap1_LSI"} <= set(cells.columns)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_evaluate_features_errors(tmp_path):
    a = blob_adata()
    with pytest.raises(EpiflowError, match="X_finetuned"):
        run(a, FeaturesConfig(umap=False), embeddings={"FT": "X_finetuned"})
    with pytest.raises(EpiflowError, match="label"):
        run(a, FeaturesConfig(label_key="celltype", umap=False))
    with pytest.raises(EpiflowError, match="n_neighbors"):
        run(a, FeaturesConfig(n_neighbors=1))
    a.obsm["X_epiagent"][3, 0] = np.nan
    with pytest.raises(EpiflowError, match="NaN"):
        run(a, FeaturesConfig(umap=False))


def test_write_metrics_rejects_wrong_table(tmp_path):
    with pytest.raises(EpiflowError):
        write_metrics(pd.DataFrame({"metric": ["NMI"], "value": [1.0]}), tmp_path / "m.tsv")


# --------------------------------------------------------------------- trajectory
def test_trajectory_on_a_line():
    # four types laid out along a thick noisy path in order A < B < C < D (a path much longer than
    # it is wide makes the diffusion components oscillate, so keep it a band, as real data are)
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 10, 240))
    y = np.array(["A", "B", "C", "D"])[np.minimum((t / 2.5).astype(int), 3)]
    a = ad.AnnData(obs=pd.DataFrame({"cell_type": y}, index=[f"c{i}" for i in range(t.size)]))
    a.obsm["X_line"] = np.c_[t, rng.normal(scale=0.5, size=t.size)].astype(np.float32)
    tab = trajectory(a, "X_line", root_type="A", order="A < B < C < D", n_neighbors=15)
    assert tab["cell_type"].tolist() == ["A", "B", "C", "D"]
    assert tab.attrs["spearman_types"] == pytest.approx(1.0)
    assert tab.attrs["spearman_cells"] > 0.9
    assert a.obs_names[tab.attrs["root_index"]] == tab.attrs["root_cell"]
    assert y[tab.attrs["root_index"]] == "A"
    assert tab["mean_pseudotime"].is_monotonic_increasing
    with pytest.raises(EpiflowError, match="root"):
        trajectory(a, "X_line", root_type="HSC", order="A < B")


def test_trajectory_with_disconnected_types():
    """Types far apart share no kNN edge: PAGA (which scanpy cannot run on an edgeless group graph)
    gets all-zero connectivities and only the root's component has a pseudotime."""
    rng = np.random.default_rng(1)
    y = np.repeat(["A", "B", "C"], [40, 30, 20])
    centre = {"A": 0.0, "B": 100.0, "C": 200.0}
    a = ad.AnnData(obs=pd.DataFrame({"cell_type": y}, index=[f"c{i}" for i in range(y.size)]))
    a.obsm["X"] = (np.array([centre[t] for t in y])[:, None] + rng.normal(size=(y.size, 3))).astype(np.float32)
    tab = trajectory(a, "X", root_type="A", order="A < B < C", n_neighbors=10)
    assert tab.attrs["n_cells_unreachable"] == 50
    assert (tab.attrs["paga_connectivities"].to_numpy() == 0).all()
    m = tab.set_index("cell_type")
    assert np.isfinite(m.loc["A", "mean_pseudotime"]) and m.loc[["B", "C"], "mean_pseudotime"].isna().all()
    assert math.isnan(tab.attrs["spearman_types"])


@pytest.mark.realdata
def test_trajectory_buenrostro_lsi(data_dir, tmp_path):
    a = ad.read_h5ad(data_dir / "buenrostro2018_bm0828.h5ad")
    a.obsm["X_lsi"] = lsi(a.X, 50)
    tab = trajectory(a, "X_lsi")  # HSC root, haematopoietic order (EpiAgent Fig. 2d-g)
    # observed: spearman_types 0.95, spearman_cells 0.80-0.84 over seeds and 30/50 components
    assert tab.attrs["spearman_types"] > 0.7
    assert tab.attrs["spearman_cells"] > 0.6
    assert tab.attrs["n_cells_unreachable"] == 0
    m = tab.set_index("cell_type")["mean_pseudotime"]
    assert m.idxmin() == "HSC" and m["HSC"] < m["MPP"] < m[["GMP", "MEP", "CLP"]].min()
    assert set(m.index) == {"HSC", "MPP", "LMPP", "CMP", "GMP", "MEP", "CLP"}
    # the whole evaluation with the trajectory, as the CLI runs it
    cfg = FeaturesConfig(trajectory=True)
    result = run(a, cfg, embeddings={"LSI": "X_lsi"})
    write_features(result, tmp_path, cfg)
    table = result.metrics
    v = table.set_index(["task", "metric"])["value"]
    assert v["trajectory", "spearman_types"] > 0.7
    assert v["feature_extraction", "leiden_reached"] == 1
    assert 0.3 < v["feature_extraction", "NMI"] <= 1.0  # observed 0.55
    assert (tmp_path / "trajectory.png").exists()
    assert len(pd.read_csv(tmp_path / "trajectory.tsv", sep="\t")) == 7
    paga = pd.read_csv(tmp_path / "paga.tsv", sep="\t")  # 7 types: 21 pairs, the PAGA graph of panel fig2e
    assert len(paga) == 21 and set(paga.columns) == {"dataset", "method", "type_a", "type_b", "connectivity"}
    assert paga["connectivity"].max() > 0
