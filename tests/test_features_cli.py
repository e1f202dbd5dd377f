"""``epiflow evaluate-features`` on a small corpus built in the test."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from epiflow.cli import main
from epiflow.corpus.shard import open_corpus, shard_from_counts, write_corpus_meta, write_shard
from epiflow.tokenize import document_frequency

TYPES = np.array(["T0", "T1", "T2"])


def make_corpus(root, seed=0, n_per=40, n_feat=300):
    """Two datasets (toyA: 3 types x n_per cells, 6 unlabelled; toyB: 20 cells), in 2 shards."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per)
    p = np.full((3, n_feat), 0.03)
    for t in range(3):
        p[t, t * 100:(t + 1) * 100] = 0.4
    d = rng.uniform(0.5, 1.5, y.size)
    xa = (rng.random((y.size, n_feat)) < np.clip(d[:, None] * p[y], 0, 1)).astype(np.float32)
    xb = (rng.random((20, n_feat)) < 0.1).astype(np.float32)
    xb[:, 0] = 1
    counts = sp.csr_matrix(np.vstack([xa, xb]))
    labels = TYPES[y].astype(object)
    labels[[0, 50, 100]] = ""
    labels[[1, 51, 101]] = "nan"
    obs = pd.DataFrame({
        "cell_id": [f"a{i}" for i in range(y.size)] + [f"b{i}" for i in range(20)],
        "dataset": ["toyA"] * y.size + ["toyB"] * 20,
        "tissue": "blood", "batch": "b0",
        "cell_type": list(labels) + ["U"] * 20,
    })
    df = document_frequency(counts)
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.bed").write_text("".join(f"chr1\t{i * 1000}\t{i * 1000 + 500}\n" for i in range(n_feat)))
    np.save(root / "df.npy", df)
    perm = rng.permutation(counts.shape[0])  # cells of both datasets in both shards, shuffled
    halves = [perm[: len(perm) // 2], perm[len(perm) // 2:]]
    paths = []
    for i, rows in enumerate(halves):
        sh = shard_from_counts(counts[rows], df, obs.iloc[rows], vocab_id="toy", genome="hg38")
        write_shard(root / "shards" / f"shard_{i:05d}.h5", sh)
        paths.append(f"shards/shard_{i:05d}.h5")
    write_corpus_meta(root, {"n_cells": int(counts.shape[0]), "n_ccres": n_feat, "vocab_id": "toy",
                             "genome": "hg38", "shards": paths, "shard_cells": [len(h) for h in halves]})
    return obs, y


def make_embeddings(path, obs, y, *, good=True, seed=0, drop_first_rows=0):
    """An 'epiflow embed'-like output: obs from the shards, obsm X_epiagent (blobs by type if good)."""
    rng = np.random.default_rng(seed)
    a_rows = np.flatnonzero(obs["dataset"] == "toyA")
    emb = rng.normal(size=(len(obs), 16)).astype(np.float32)
    if good:
        emb[a_rows] += np.eye(16)[y][:, :16] * 40
    o = obs.iloc[drop_first_rows:].astype(str)
    e = ad.AnnData(obs=o.set_index(o["cell_id"].to_numpy()))
    # reversed order: the command must match cells by id, not by position
    e = e[::-1].copy()
    e.obsm["X_epiagent"] = emb[drop_first_rows:][::-1].copy()
    e.write_h5ad(path)
    return path


@pytest.fixture
def toy(tmp_path):
    corpus = tmp_path / "corpus"
    obs, y = make_corpus(corpus)
    assert open_corpus(corpus).n_cells == len(obs)
    return tmp_path, corpus, obs, y


def test_cli_evaluate_features_corpus(toy, capsys):
    tmp, corpus, obs, y = toy
    emb = make_embeddings(tmp / "emb.h5ad", obs, y)
    ft = make_embeddings(tmp / "ft.h5ad", obs, y, good=False, seed=1)
    out = tmp / "fe"
    rc = main(["evaluate-features", "--embeddings", str(emb), "--embeddings", f"EpiAgent-FT={ft}",
               "--corpus", str(corpus), "--dataset", "toyA", "--lsi-components", "20",
               "--n-neighbors", "10", "--out-dir", str(out)])
    assert rc == 0
    table = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert list(table.columns) == ["task", "dataset", "method", "metric", "value"]
    assert set(table["method"]) == {"EpiAgent", "EpiAgent-FT", "LSI"}
    assert set(table["dataset"]) == {"toyA"}
    v = table.set_index(["method", "metric"])["value"]
    # 120 toyA cells, 6 with an empty / 'nan' label excluded
    assert v["EpiAgent", "n_cells"] == 114 and v["EpiAgent", "n_cells_unlabelled"] == 6
    assert v["EpiAgent", "NMI"] == pytest.approx(1.0) and v["EpiAgent", "ARI"] == pytest.approx(1.0)
    assert v["LSI", "NMI"] == pytest.approx(1.0)  # LSI separates the synthetic types
    assert v["EpiAgent-FT", "NMI"] < 0.5  # the random embedding does not
    assert v["LSI", "n_dims"] == 20 - v["LSI", "lsi_dropped_first"]
    for f in ["umap.png", "umap_EpiAgent.png", "umap_EpiAgent-FT.png", "umap_LSI.png", "cells.tsv"]:
        assert (out / f).exists(), f
    # the files the command wrote before the settings refactoring (#18), no more, no fewer
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metrics.tsv", "cells.tsv", "umap.png", "umap_EpiAgent.png", "umap_EpiAgent-FT.png", "umap_LSI.png"])
    assert "NMI" in capsys.readouterr().out


def test_cli_lsi_matches_library(toy):
    """The LSI the command computes from shards equals LSI on the same cells' counts."""
    from epiflow.baselines import lsi
    from epiflow.tasks.features import load_feature_inputs

    tmp, corpus, obs, y = toy
    emb = make_embeddings(tmp / "emb.h5ad", obs, y)
    adata, methods, info = load_feature_inputs({"EpiAgent": emb}, corpus=corpus, dataset="toyA",
                                               lsi_components=10)
    assert methods == {"EpiAgent": "X_epiagent", "LSI": "X_lsi"}
    assert adata.n_obs == 120
    # rebuild the counts in the embeddings' cell order from the shards directly
    c = open_corpus(corpus)
    shards = list(c.iter_shards())
    allc = sp.vstack([s.counts_csr() for s in shards], format="csr")
    ids = np.concatenate([s.obs["cell_id"].to_numpy() for s in shards])
    idx = pd.Index(ids).get_indexer(adata.obs["cell_id"].to_numpy())
    np.testing.assert_allclose(adata.obsm["X_lsi"], lsi(allc[idx], 10), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(adata.obs["cell_id"].to_numpy(), ids[idx])


def test_cli_lsi_only_from_counts_h5ad(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    x = (rng.random((90, 300)) < np.where(np.arange(300)[None] // 100 == y[:, None], 0.4, 0.03)).astype(np.float32)
    a = ad.AnnData(X=sp.csr_matrix(x), obs=pd.DataFrame({"cell_type": TYPES[y], "dataset": "h"},
                                                        index=[f"c{i}" for i in range(90)]))
    a.write_h5ad(tmp_path / "counts.h5ad")
    out = tmp_path / "out"
    rc = main(["evaluate-features", "--counts", str(tmp_path / "counts.h5ad"), "--lsi-components", "10",
               "--no-umap", "--n-neighbors", "10", "--out-dir", str(out)])
    assert rc == 0
    t = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert set(t["method"]) == {"LSI"}
    assert t.set_index("metric").loc["NMI", "value"] == pytest.approx(1.0)
    assert not (out / "umap.png").exists()


def test_cli_lsi_only_from_corpus(toy):
    tmp, corpus, obs, y = toy
    out = tmp / "lsi_only"
    assert main(["evaluate-features", "--corpus", str(corpus), "--dataset", "toyA", "--lsi-components", "10",
                 "--no-umap", "--n-neighbors", "10", "--out-dir", str(out)]) == 0
    v = pd.read_csv(out / "metrics.tsv", sep="\t").set_index(["method", "metric"])["value"]
    assert v["LSI", "n_cells"] == 114 and v["LSI", "n_cells_unlabelled"] == 6
    assert v["LSI", "NMI"] == pytest.approx(1.0)


def test_cli_errors(toy, capsys):
    tmp, corpus, obs, y = toy
    # the embeddings hold a cell the corpus does not
    e = ad.read_h5ad(make_embeddings(tmp / "emb.h5ad", obs, y))
    e.obs["cell_id"] = e.obs["cell_id"].astype(str).str.replace("a7", "zz7", regex=False)
    e.write_h5ad(tmp / "bad.h5ad")
    out = tmp / "o"
    assert main(["evaluate-features", "--embeddings", str(tmp / "bad.h5ad"), "--corpus", str(corpus),
                 "--out-dir", str(out)]) == 2
    assert "not in the corpus" in capsys.readouterr().err
    assert main(["evaluate-features", "--embeddings", str(tmp / "emb.h5ad"), "--corpus", str(corpus),
                 "--embedding-key", "X_nope", "--out-dir", str(out)]) == 2
    assert "X_nope" in capsys.readouterr().err
    assert main(["evaluate-features", "--embeddings", str(tmp / "emb.h5ad"), "--corpus", str(corpus),
                 "--dataset", "nope", "--out-dir", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["evaluate-features", "--embeddings", str(tmp / "emb.h5ad"), "--corpus", str(tmp / "nowhere"),
                 "--out-dir", str(out)]) == 2
    assert "corpus.json" in capsys.readouterr().err
    assert main(["evaluate-features", "--embeddings", str(tmp / "emb.h5ad"), "--out-dir", str(out)]) == 2
    assert "--corpus" in capsys.readouterr().err
    assert not (out / "metrics.tsv").exists()


def test_cli_lsi_on_the_datasets_own_features(toy):
    """--own-features: LSI on the dataset's own cell x peak matrix (other features, cells in another order
    and more of them), matched on the cell's barcode, is a row beside LSI on the corpus vocabulary."""
    from epiflow.baselines import lsi
    from epiflow.tasks.features import OWN_FEATURES_KEY, load_feature_inputs

    tmp, corpus, obs, y = toy
    rng = np.random.default_rng(5)
    a_obs = obs[obs["dataset"] == "toyA"].reset_index(drop=True)
    n_own = 450
    p = np.full((3, n_own), 0.02)
    for t in range(3):
        p[t, 300 + t * 50:300 + (t + 1) * 50] = 0.5  # the signal sits on peaks the corpus never had
    x = (rng.random((len(a_obs), n_own)) < p[y]).astype(np.float32)
    extra = (rng.random((15, n_own)) < 0.05).astype(np.float32)  # cells of the file not in the corpus
    names = np.concatenate([a_obs["cell_id"].to_numpy(), [f"x{i}" for i in range(15)]])
    order = rng.permutation(len(names))
    src = ad.AnnData(X=sp.csr_matrix(np.vstack([x, extra])[order]), obs=pd.DataFrame(index=names[order]))
    src.write_h5ad(tmp / "own.h5ad")
    emb = make_embeddings(tmp / "emb.h5ad", obs, y)

    adata, methods, info = load_feature_inputs({"EpiAgent": emb}, corpus=corpus, dataset="toyA", lsi_components=10,
                                               own_features_h5ad=tmp / "own.h5ad")
    assert list(methods) == ["EpiAgent", "LSI", "LSI-own-features"]
    idx = pd.Index(names[order]).get_indexer(adata.obs["cell_id"].to_numpy())
    want = lsi(sp.csr_matrix(np.vstack([x, extra])[order])[idx], 10)
    np.testing.assert_allclose(adata.obsm[OWN_FEATURES_KEY], want, rtol=1e-5, atol=1e-5)
    assert info["own_features"]["n_features"] == n_own

    out = tmp / "fe_own"
    assert main(["evaluate-features", "--embeddings", str(emb), "--corpus", str(corpus), "--dataset", "toyA",
                 "--lsi-components", "10", "--n-neighbors", "10", "--no-umap", "--own-features", str(tmp / "own.h5ad"),
                 "--out-dir", str(out)]) == 0
    v = pd.read_csv(out / "metrics.tsv", sep="\t").set_index(["method", "metric"])["value"]
    assert v["LSI-own-features", "NMI"] > 0.9 and v["LSI-own-features", "n_features"] == n_own
    assert v["LSI-own-features", "n_cells"] == v["LSI", "n_cells"] == 114

    src[: len(names) // 2].write_h5ad(tmp / "half.h5ad")  # some evaluated cells are missing
    with pytest.raises(Exception, match="evaluated cells are not in the own-features file"):
        load_feature_inputs({"EpiAgent": emb}, corpus=corpus, dataset="toyA", own_features_h5ad=tmp / "half.h5ad")
