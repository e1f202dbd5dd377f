"""Inference: embed AnnData / shard / corpus, token-budget batching, CLI ``epiflow embed``."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from epiflow.cli import main as cli_main
from epiflow.corpus.shard import shard_from_counts, write_corpus_meta, write_shard
from epiflow.errors import InputFormatError, VocabularyMismatchError
from epiflow.model import embed, embed_sentences, inference_context, load_epiagent_checkpoint
from epiflow.model.inference import autocast_dtype, token_budget_batches

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tok(fixtures_dir):
    d = np.load(fixtures_dir / "tokenization_io.npz", allow_pickle=False)
    counts = sp.csr_matrix((d["counts_data"], d["counts_indices"], d["counts_indptr"]),
                           shape=tuple(d["counts_shape"]))
    return {"counts": counts, "df": d["df"], "sentences": d["sentences"], "offsets": d["sentence_offsets"]}


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return load_epiagent_checkpoint(fixtures_dir / "epiagent_tiny.pth", num_heads=4)


@pytest.fixture(scope="module")
def reference(model, tok):
    """One cell at a time, no padding: the embedding every batched path must reproduce."""
    out = []
    with torch.no_grad():
        for i in range(len(tok["offsets"]) - 1):  # 50 tiny cells
            s = tok["sentences"][tok["offsets"][i]:tok["offsets"][i + 1]]
            ids = torch.tensor([[1, *s.tolist(), 2]])
            out.append(model(ids).cell_embedding[0].numpy())
    return np.stack(out)


def _obs(n):
    return pd.DataFrame({"cell_id": [f"c{i:02d}" for i in range(n)], "batch": np.arange(n) % 3})


def test_embed_anndata_both_backends(model, tok, reference):
    for backend in ("sdpa", "packed"):
        a = ad.AnnData(X=tok["counts"].copy(), obs=_obs(50).set_index("cell_id"))
        a.var["df"] = tok["df"]
        res = embed(a, model, backend=backend, batch_tokens=200, progress=False)
        assert res is a and a.obsm["X_epiagent"].shape == (50, 64)
        np.testing.assert_allclose(a.obsm["X_epiagent"], reference, **TOL)
    model.set_backend("sdpa")


def test_embed_shard_and_order(model, tok, reference):
    shard = shard_from_counts(tok["counts"], tok["df"], _obs(50))
    res = embed(shard, model, batch_tokens=150, progress=False)
    assert list(res.obs_names) == [f"c{i:02d}" for i in range(50)]
    np.testing.assert_allclose(res.obsm["X_epiagent"], reference, **TOL)


def test_top_k_truncation(model, tok):
    indptr = tok["offsets"]
    got = embed_sentences(model, indptr, tok["sentences"], max_len=10, progress=False, device="cpu")
    with torch.no_grad():
        s = tok["sentences"][indptr[7]:indptr[8]][:10]
        ref = model(torch.tensor([[1, *s.tolist(), 2]])).cell_embedding[0].numpy()
    np.testing.assert_allclose(got[7], ref, **TOL)


def test_token_budget_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 400, size=500)
    batches = token_budget_batches(lengths, batch_tokens=1000, max_cells=64)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    assert np.all(np.diff(lengths[flat]) <= 0)  # longest first
    for b in batches:
        assert len(b) <= 64
        assert len(b) == 1 or len(b) * lengths[b].max() <= 1000
    assert [len(b) for b in token_budget_batches([5000, 10], batch_tokens=100)] == [1, 1]


def test_autocast_selection(monkeypatch):
    assert autocast_dtype("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("cuda:1") is torch.float16
    with inference_context("cpu"):
        assert torch.is_inference_mode_enabled()
        assert not torch.is_autocast_enabled("cpu")


def test_embed_vocabulary_and_df_errors(model, tok):
    a = ad.AnnData(X=tok["counts"][:, :299].copy())
    with pytest.raises(VocabularyMismatchError, match="299 cCREs but the model has 300"):
        embed(a, model, progress=False)
    b = ad.AnnData(X=tok["counts"].copy())
    with pytest.raises(InputFormatError, match="document frequencies"):
        embed(b, model, progress=False)


def test_embed_batch_key(fixtures_dir, tok):
    bc = load_epiagent_checkpoint(fixtures_dir / "epiagent_tiny_bc.pth", num_heads=4)
    shard = shard_from_counts(tok["counts"][:6], tok["df"], _obs(6))
    with_b = embed(shard, bc, batch_key="batch", progress=False).obsm["X_epiagent"]
    without = embed(shard, bc, progress=False).obsm["X_epiagent"]
    with torch.no_grad():
        s = shard.sentence(4).tolist()
        ref = bc(torch.tensor([[1, *s, 2]]), batch_ids=torch.tensor([4 % 3])).cell_embedding[0].numpy()
    np.testing.assert_allclose(with_b[4], ref, **TOL)
    assert not np.allclose(with_b[4], without[4])


def _corpus(root, tok, n_ccres=300):
    shards = []
    for j, rows in enumerate((np.arange(0, 30), np.arange(30, 50))):
        obs = _obs(50).iloc[rows].reset_index(drop=True)
        path = root / "shards" / f"shard_{j:05d}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        sh = shard_from_counts(tok["counts"][rows], tok["df"], obs)
        sh.n_ccres = n_ccres
        write_shard(path, sh)
        shards.append(f"shards/shard_{j:05d}.h5")
    np.save(root / "df.npy", tok["df"])
    write_corpus_meta(root, {"n_cells": 50, "n_ccres": n_ccres, "shards": shards, "shard_cells": [30, 20]})
    return root


def test_cli_embed_corpus_and_input(fixtures_dir, tok, reference, tmp_path):
    corpus = _corpus(tmp_path / "corpus", tok)
    out = tmp_path / "emb.h5ad"
    rc = cli_main(["embed", "--checkpoint", str(fixtures_dir / "epiagent_tiny.pth"), "--num-heads", "4",
                   "--corpus", str(corpus), "--out", str(out), "--backend", "packed", "--batch-tokens", "300",
                   "--device", "cpu", "--no-progress"])
    assert rc == 0
    res = ad.read_h5ad(out)
    assert list(res.obs["cell_id"]) == [f"c{i:02d}" for i in range(50)]
    np.testing.assert_allclose(res.obsm["X_epiagent"], reference, **TOL)
    assert res.uns["epiflow_embed"]["backend"] == "packed"

    h5ad = tmp_path / "counts.h5ad"
    ad.AnnData(X=tok["counts"].copy(), obs=_obs(50).set_index("cell_id")).write_h5ad(h5ad)
    np.save(tmp_path / "df.npy", tok["df"])
    out2 = tmp_path / "emb2.h5ad"
    assert cli_main(["embed", "--checkpoint", str(fixtures_dir / "epiagent_tiny.pth"), "--num-heads", "4",
                     "--input", str(h5ad), "--df", str(tmp_path / "df.npy"), "--out", str(out2),
                     "--device", "cpu", "--no-progress"]) == 0
    np.testing.assert_allclose(ad.read_h5ad(out2).obsm["X_epiagent"], reference, **TOL)
    # one flag for every kind of cells (#18): --corpus takes the h5ad too, and a single shard
    out3 = tmp_path / "emb3.h5ad"
    assert cli_main(["embed", "--checkpoint", str(fixtures_dir / "epiagent_tiny.pth"), "--num-heads", "4",
                     "--corpus", str(h5ad), "--df", str(tmp_path / "df.npy"), "--out", str(out3),
                     "--device", "cpu", "--no-progress"]) == 0
    np.testing.assert_allclose(ad.read_h5ad(out3).obsm["X_epiagent"], reference, **TOL)
    out4 = tmp_path / "emb4.h5ad"
    assert cli_main(["embed", "--checkpoint", str(fixtures_dir / "epiagent_tiny.pth"), "--num-heads", "4",
                     "--corpus", str(corpus / "shards" / "shard_00001.h5"), "--out", str(out4),
                     "--device", "cpu", "--no-progress"]) == 0
    np.testing.assert_allclose(ad.read_h5ad(out4).obsm["X_epiagent"], reference[30:], **TOL)


def test_checkpoint_remembers_its_vocabulary(fixtures_dir, tok, tmp_path, capsys):
    """A model trained on one cCRE vocabulary is refused on data of another vocabulary of the same
    size: the checkpoint's side file (or pretrain's model_config.json beside it) names its vocab_id,
    and embed, the task verbs' loader and derived (fine-tuned) models compare it with the data's."""
    import json
    import shutil

    from epiflow.model import derive, save_epiagent_checkpoint
    from epiflow.model.checkpoint import checkpoint_vocab_id
    from epiflow.tasks.common import load_model

    corpus = _corpus(tmp_path / "corpus", tok)
    meta = json.loads((corpus / "corpus.json").read_text())
    (corpus / "corpus.json").write_text(json.dumps({**meta, "vocab_id": "aaaa"}))
    base = load_epiagent_checkpoint(fixtures_dir / "epiagent_tiny.pth", num_heads=4)
    assert base.vocab_id is None  # the authors' format knows no vocabulary: nothing to compare
    base.vocab_id = "bbbb"
    ckpt = save_epiagent_checkpoint(base, tmp_path / "m" / "checkpoint.pth", write_config=True)
    assert checkpoint_vocab_id(ckpt) == "bbbb"
    model = load_epiagent_checkpoint(ckpt)
    assert model.vocab_id == "bbbb" and derive(model, classes=3).vocab_id == "bbbb"
    with pytest.raises(VocabularyMismatchError, match="vocabulary bbbb but the corpus .* aaaa"):
        embed(corpus, model, progress=False)
    with pytest.raises(VocabularyMismatchError, match="vocab_id"):
        load_epiagent_checkpoint(ckpt, corpus=corpus)
    with pytest.raises(VocabularyMismatchError, match="bbbb.*cccc"):
        load_model(ckpt, n_ccres=300, vocab_id="cccc")
    with pytest.raises(VocabularyMismatchError, match="bbbb.*cccc"):
        load_model(model, n_ccres=300, vocab_id="cccc")
    assert load_model(ckpt, n_ccres=300, vocab_id="bbbb").vocab_id == "bbbb"
    rc = cli_main(["embed", "--checkpoint", str(ckpt), "--corpus", str(corpus), "--out",
                   str(tmp_path / "e.h5ad"), "--device", "cpu", "--no-progress"])
    assert rc != 0 and not (tmp_path / "e.h5ad").exists()
    assert "aaaa" in capsys.readouterr().err
    # a checkpoint saved before the side file carried it: pretrain's model_config.json beside it
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(fixtures_dir / "epiagent_tiny.pth", old / "checkpoint.pth")
    (old / "model_config.json").write_text(json.dumps({"n_ccres": 300, "vocab_id": "dddd"}))
    assert checkpoint_vocab_id(old / "checkpoint.pth", 300) == "dddd"
    assert checkpoint_vocab_id(old / "checkpoint.pth", 301) is None  # another model's config
    # the same vocabulary passes
    (corpus / "corpus.json").write_text(json.dumps({**meta, "vocab_id": "bbbb"}))
    assert embed(corpus, model, progress=False).obsm["X_epiagent"].shape == (50, model.config.dim)


def test_cli_embed_flags(tmp_path, capsys):
    """The I/O flags named as on every verb; --backend takes the same choices as the task verbs."""
    from epiflow.tasks.config import BACKENDS

    with pytest.raises(SystemExit):
        cli_main(["embed", "--checkpoint", "c.pth", "--corpus", str(tmp_path), "--out", str(tmp_path / "e.h5ad"),
                  "--backend", "nope"])
    err = capsys.readouterr().err
    assert "nope" in err and all(b in err for b in BACKENDS)
    rc = cli_main(["embed", "--checkpoint", "c.pth", "--corpus", str(tmp_path / "nowhere"),
                   "--out", str(tmp_path / "e.h5ad")])
    assert rc == 2 and "nowhere" in capsys.readouterr().err
    # --progress / --no-progress, as on every verb (embed had only --no-progress)
    from epiflow.cli import build_parser

    parser = build_parser(["embed"])
    base = ["embed", "--checkpoint", "c.pth", "--corpus", "c", "--out", "e.h5ad"]
    assert parser.parse_args(base).progress is True
    assert parser.parse_args(base + ["--progress"]).progress is True
    assert parser.parse_args(base + ["--no-progress"]).progress is False


def test_cli_embed_device_as_every_verb(fixtures_dir, tok, reference, tmp_path, capsys):
    """--device auto (the default of every verb) works; a typo is a clear error, not a torch traceback."""
    corpus = _corpus(tmp_path / "corpus", tok)
    out = tmp_path / "emb.h5ad"
    base = ["embed", "--checkpoint", str(fixtures_dir / "epiagent_tiny.pth"), "--num-heads", "4",
            "--corpus", str(corpus), "--out", str(out), "--no-progress", "--device"]
    assert cli_main(base + ["gpu"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "'gpu'" in err and "auto|cpu|cuda" in err, err
    assert not out.exists()
    if not torch.cuda.is_available():  # auto = CPU here (on a GPU machine the tolerance may differ)
        assert cli_main(base + ["auto"]) == 0
        np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_epiagent"], reference, **TOL)


def test_cli_embed_h5ad_size_mismatch_names_the_h5ad_and_the_checkpoint(fixtures_dir, tok, tmp_path, capsys):
    h5ad = tmp_path / "counts.h5ad"
    ad.AnnData(X=sp.random(5, 301, density=0.2, format="csr", dtype=np.float32, random_state=0)).write_h5ad(h5ad)
    ckpt = fixtures_dir / "epiagent_tiny.pth"
    out = tmp_path / "emb.h5ad"
    rc = cli_main(["embed", "--checkpoint", str(ckpt), "--num-heads", "4", "--corpus", str(h5ad),
                   "--out", str(out), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(h5ad) in err and str(ckpt) in err and "301" in err and "Fix:" in err, err
    assert not out.exists()


def test_cli_embed_vocabulary_mismatch_writes_nothing(fixtures_dir, tok, tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus", tok, n_ccres=301)
    out = tmp_path / "emb.h5ad"
    rc = cli_main(["embed", "--checkpoint", str(fixtures_dir / "epiagent_tiny.pth"), "--num-heads", "4",
                   "--corpus", str(corpus), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert rc == 2
    assert "301" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".emb.h5ad*"))
