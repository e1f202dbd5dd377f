"""Issue #15 options: LSI recipes, the mean-pooled readout, popularity-matched CCA negatives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from epiflow.baselines.lsi import DEFAULT_RECIPE, LSI_RECIPES, lsi, parse_recipe, tfidf_lsi_matrix
from epiflow.errors import ConfigError, EpiflowError, InputFormatError
from epiflow.model import EpiAgentConfig, from_config
from epiflow.model.inference import cell_readout, embed_sentences
from epiflow.train import rng as krng
from epiflow.train.sampling import sample_complement_weighted

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- LSI recipes
def _typed(n_per=40, n_feat=240, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per)
    p = np.full((3, n_feat), 0.03)
    for t in range(3):
        p[t, t * 80:(t + 1) * 80] = 0.4
    d = rng.uniform(0.5, 1.5, size=y.size)
    x = (rng.random((y.size, n_feat)) < np.clip(d[:, None] * p[y], 0, 1)).astype(np.float32)
    return sp.csr_matrix(x * rng.integers(1, 3, size=x.shape)), y


def test_tfidf_kinds_known_values():
    x = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0]]))
    idf = math.log(2.0)  # log(1 + 2 / (1 + 1))
    np.testing.assert_allclose(tfidf_lsi_matrix(x, "plain").toarray(),
                               [[0.5 * idf, 0, 0.5 * idf], [0, idf, 0]], rtol=1e-6)
    # signac: log1p(tf * n / n_open * 1e4), n / n_open = 2
    np.testing.assert_allclose(tfidf_lsi_matrix(x, "signac").toarray(),
                               [[math.log1p(1e4), 0, math.log1p(1e4)], [0, math.log1p(2e4), 0]], rtol=1e-6)
    with pytest.raises(EpiflowError, match="TF-IDF kind"):
        tfidf_lsi_matrix(x, "tfidf")


def test_lsi_recipe_scalings_and_errors():
    x, _ = _typed()
    us = lsi(x, 10, drop_first=False, recipe="log+us")
    z = lsi(x, 10, drop_first=False, recipe="log+zscore")
    l2 = lsi(x, 10, drop_first=False, recipe="log+l2")
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(0, ddof=1), 1, rtol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(l2, axis=1), 1, rtol=1e-5)
    # the scalings are rescalings of the same U * S
    np.testing.assert_allclose(l2, us / np.linalg.norm(us, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)
    assert parse_recipe(None) == tuple(DEFAULT_RECIPE.split("+"))
    for bad in ("log", "log+pca", "x+us", "log+us+l2"):
        with pytest.raises(EpiflowError, match="unknown LSI recipe"):
            lsi(x, 10, recipe=bad)
    _, info = lsi(x, 10, recipe="plain+l2", return_info=True)
    assert info["recipe"] == "plain+l2"


@pytest.mark.parametrize("recipe", LSI_RECIPES)
def test_every_lsi_recipe_separates_clear_types(recipe):
    from epiflow.metrics import clustering_scores, leiden_bisect

    x, y = _typed()
    emb = lsi(x, 10, recipe=recipe)
    labels, _, _ = leiden_bisect(emb, 3, n_neighbors=10)
    assert clustering_scores(y, labels)["NMI"] > 0.8


# ----------------------------------------------------------------------------- readout
def _tiny_model():
    torch.manual_seed(0)
    cfg = EpiAgentConfig.preset("tiny", n_ccres=50, max_rank=64, dropout=0.0)
    return from_config(cfg).eval()


def test_mean_readout_is_the_mean_of_the_ccre_token_outputs():
    model = _tiny_model()
    ids = torch.tensor([[1, 10, 11, 12, 2, 0, 0], [1, 20, 21, 22, 23, 24, 2]])
    with torch.no_grad():
        out = model(ids)
        cls = cell_readout(out, ids, "cls")
        mean = cell_readout(out, ids, "mean")
        torch.testing.assert_close(cls, out.hidden[:, 0])
        torch.testing.assert_close(mean[0], out.hidden[0, 1:4].mean(0))
        torch.testing.assert_close(mean[1], out.hidden[1, 1:6].mean(0))
        # padding does not change a cell's mean readout
        alone = model(ids[:1, :5])
        torch.testing.assert_close(cell_readout(alone, ids[:1, :5], "mean")[0], mean[0], atol=1e-5, rtol=1e-5)


def test_embed_sentences_readout_option():
    model = _tiny_model()
    indptr = np.array([0, 3, 8])
    tokens = np.array([10, 11, 12, 20, 21, 22, 23, 24])
    cls = embed_sentences(model, indptr, tokens, progress=False, device="cpu")
    mean = embed_sentences(model, indptr, tokens, progress=False, device="cpu", readout="mean")
    assert cls.shape == mean.shape == (2, model.config.dim)
    assert not np.allclose(cls, mean)
    with torch.no_grad():
        out = model(torch.tensor([[1, 10, 11, 12, 2]]))
    np.testing.assert_allclose(mean[0], out.hidden[0, 1:4].mean(0).numpy(), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputFormatError, match="readout"):
        embed_sentences(model, indptr, tokens, progress=False, device="cpu", readout="max")


# ----------------------------------------------------------------------------- weighted negatives
def _positives(rng, n, lens):
    pos = [rng.choice(n, size=ln, replace=False) for ln in lens]
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return pos, indptr, np.concatenate(pos).astype(np.int64)


def test_weighted_negatives_disjoint_unique_and_counted():
    rng = np.random.default_rng(0)
    N = 200
    lens = np.array([0, 1, 5, 30, 90, 150, 199, 200])
    pos, indptr, flat = _positives(rng, N, lens)
    k = np.array([3, 5, 10, 60, 450, 40, 7, 3])
    w = rng.random(N) ** 3
    w[:20] = 0.0  # zero-weight cCREs: only the uniform fill may draw them
    keys = krng.cell_keys(1, 0, krng.NEGATIVES, np.arange(len(lens)))
    ip, neg = sample_complement_weighted(keys, indptr, flat, N, k, w)
    np.testing.assert_array_equal(np.diff(ip), np.minimum(k, N - lens))
    for i in range(len(lens)):
        n = neg[ip[i]:ip[i + 1]]
        assert len(np.unique(n)) == len(n)
        assert not set(n.tolist()) & set(pos[i].tolist())
        assert n.min(initial=0) >= 0 and n.max(initial=0) < N
        if np.diff(ip)[i] <= 10:  # small requests never need the fill
            assert (n >= 20).all()


def test_weighted_negatives_follow_the_weights():
    N = 100
    w = np.where(np.arange(N) < 50, 1.0, 9.0)  # the upper half is 9x as likely
    indptr = np.array([0, 2])
    flat = np.array([0, 99])
    counts = np.zeros(N)
    for rep in range(300):
        keys = krng.cell_keys(rep, 0, krng.NEGATIVES, np.array([3]))
        ip, neg = sample_complement_weighted(keys, indptr, flat, N, np.array([2]), w)
        counts[neg] += 1
    assert counts[[0, 99]].sum() == 0
    assert counts[50:].sum() > 5 * counts[:50].sum()
    with pytest.raises(ValueError, match="weights"):
        sample_complement_weighted(keys, indptr, flat, N, np.array([2]), np.zeros(N))


def test_pretrain_config_cca_negatives_option(tmp_path):
    from epiflow.train.pretrain import PretrainConfig

    assert PretrainConfig().cca_negatives == "uniform"  # the paper's uniform negatives by default
    with pytest.raises(ConfigError, match="cca_negatives"):
        PretrainConfig(cca_negatives="hard").validate()
    assert PretrainConfig().sr_objective == "bce"  # the paper's SR by default
    with pytest.raises(ConfigError, match="sr_objective"):
        PretrainConfig(sr_objective="poisson").validate()
    PretrainConfig(sr_objective="multinomial", memory_lean=True).validate()  # both paths implement it


def test_pretrain_with_df_negatives_runs(tmp_path):
    """A few steps with popularity-matched negatives on the toy corpus; the batches' negatives come
    from the corpus df (a cCRE with df 0 is never drawn)."""
    from epiflow.train.data import BatchConfig, ShardCache, build_index, make_batch
    from epiflow.train.pretrain import PretrainConfig, pretrain
    from epiflow.train.toy import write_toy_corpus

    corpus = write_toy_corpus(tmp_path / "corpus")
    index = build_index(corpus)
    df = np.load(corpus / "df.npy")
    b = make_batch(ShardCache(index), np.arange(min(16, index.n_cells)), 0,
                   BatchConfig(n_ccres=index.n_ccres, max_len=62, k=1, neg_weights=df))
    neg = b["cca_ids"][b["cca_label"] == 0].numpy() - 4
    assert len(neg) and (df[neg] > 0).all()
    s = pretrain(corpus, tmp_path / "run", PretrainConfig(
        model_config="tiny", max_steps=3, epochs=1, batch_tokens=512, progress=False, device="cpu",
        cca_negatives="df", eval_fraction=0.1, ckpt_every=0))
    assert s["steps"] == 3 and math.isfinite(s["last"]["loss"])


def test_pretrain_with_multinomial_sr_runs_and_logs_per_cell_nll(tmp_path):
    """The depth-invariant SR option trains; its logged SR is the mean per-cell multinomial NLL (about
    log(n cCREs) at the start, not the paper BCE's per-entry mean)."""
    from epiflow.train.pretrain import PretrainConfig, pretrain
    from epiflow.train.toy import write_toy_corpus

    corpus = write_toy_corpus(tmp_path / "corpus")
    s = pretrain(corpus, tmp_path / "run", PretrainConfig(
        model_config="tiny", max_steps=3, epochs=1, batch_tokens=512, progress=False, device="cpu",
        sr_objective="multinomial", eval_fraction=0.1, ckpt_every=0))
    n = len(np.load(corpus / "df.npy"))
    assert s["steps"] == 3 and math.isfinite(s["last"]["loss"])
    assert 0.5 * math.log(n) < s["last"]["sr"] < 2.0 * math.log(n)


def test_cli_embed_readout_mean(fixtures_dir, tmp_path):
    """``epiflow embed --readout mean`` writes the mean-pooled embedding (default stays [CLS])."""
    import anndata as ad

    from epiflow.cli import main as cli_main
    from epiflow.model import load_epiagent_checkpoint

    d = np.load(fixtures_dir / "tokenization_io.npz", allow_pickle=False)
    counts = sp.csr_matrix((d["counts_data"], d["counts_indices"], d["counts_indptr"]),
                           shape=tuple(d["counts_shape"]))[:12]
    import pandas as pd

    h5ad = tmp_path / "counts.h5ad"
    ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(12)])).write_h5ad(h5ad)
    np.save(tmp_path / "df.npy", d["df"])
    ckpt = fixtures_dir / "epiagent_tiny.pth"
    outs = {}
    for readout in ("cls", "mean"):
        out = tmp_path / f"{readout}.h5ad"
        assert cli_main(["embed", "--checkpoint", str(ckpt), "--num-heads", "4", "--input", str(h5ad),
                         "--df", str(tmp_path / "df.npy"), "--out", str(out), "--device", "cpu",
                         "--no-progress", "--readout", readout]) == 0
        outs[readout] = ad.read_h5ad(out).obsm["X_epiagent"]
    model = load_epiagent_checkpoint(ckpt, num_heads=4)
    from epiflow.model import embed

    a = ad.read_h5ad(h5ad)
    want = embed(a, model, df=d["df"], device="cpu", progress=False, readout="mean").obsm["X_epiagent"]
    np.testing.assert_allclose(outs["mean"], want, atol=1e-5, rtol=1e-5)
    assert not np.allclose(outs["cls"], outs["mean"])


def test_pretrain_cli_init_and_negatives_flags():
    import argparse

    from epiflow.train.cli import add_pretrain_args, config_from_args

    p = argparse.ArgumentParser()
    add_pretrain_args(p)
    c = config_from_args(p.parse_args(["--corpus", "c", "--out", "o", "--init", "bert", "--cca-negatives", "df",
                                       "--w-sr", "0.1", "--w-rlm", "2", "--sr-objective", "multinomial"]))
    assert c.model_overrides == {"init": "bert"} and c.cca_negatives == "df" and c.sr_objective == "multinomial"
    assert (c.w_sr, c.w_cca, c.w_rlm) == (0.1, 1.0, 2.0)
    c = config_from_args(p.parse_args(["--corpus", "c", "--out", "o"]))
    assert c.model_overrides == {} and c.cca_negatives == "uniform" and c.sr_objective == "bce"  # the paper's
    assert (c.w_sr, c.w_cca, c.w_rlm) == (1.0, 1.0, 1.0)


def test_evaluate_cca_reports_the_popularity_only_auroc(tmp_path):
    """eval.json carries the AUROC of the cell-independent df score next to the CCA AUROC; on the toy
    corpus, whose accessibility is cell-type specific, df alone is informative but not perfect."""
    import json

    from epiflow.train.data import build_index
    from epiflow.train.pretrain import PretrainConfig, evaluate_cca, pretrain
    from epiflow.train.toy import write_toy_corpus
    from epiflow.model import from_config

    corpus = write_toy_corpus(tmp_path / "corpus")
    s = pretrain(corpus, tmp_path / "run", PretrainConfig(
        model_config="tiny", max_steps=2, epochs=1, batch_tokens=512, progress=False, device="cpu",
        eval_fraction=0.1, ckpt_every=0))
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev == s["eval"] and 0.5 < ev["cca_auroc_df_only"] < 1.0
    # without df: no popularity field; a constant df scores 0.5
    index = build_index(corpus)
    model = from_config(EpiAgentConfig.preset("tiny", n_ccres=index.n_ccres))
    uids = np.arange(20)
    assert "cca_auroc_df_only" not in evaluate_cca(model, index, uids, max_len=62, seed=0)
    ev2 = evaluate_cca(model, index, uids, max_len=62, seed=0, df=np.ones(index.n_ccres))
    assert ev2["cca_auroc_df_only"] == pytest.approx(0.5)
