"""Fine-tuned feature extraction (epiflow.tasks.features_finetune): CCA (K = 1) + SR fine-tuning of a
tiny model on a structured toy corpus, the zero-shot embedding it starts from, the metric rows, and
``epiflow evaluate-features --checkpoint --epochs N [--trajectory]`` (former names ``--finetune-epochs`` ...)
and :func:`epiflow.tasks.features.run` with a model."""

import numpy as np
import pandas as pd
import pytest
import torch

from epiflow.cli import main
from epiflow.errors import ConfigError
from epiflow.model import EpiAgentConfig, from_config, save_epiagent_checkpoint
from epiflow.tasks.common import load_cells
from epiflow.tasks.config import FeaturesConfig
from epiflow.tasks.features import load_feature_inputs, run
from epiflow.tasks.features_finetune import (FINETUNED_KEY, FINETUNED_METHOD, ZEROSHOT_KEY, add_model_embeddings,
                                             finetune_embeddings)
from epiflow.train.finetune import embed_cells
from epiflow.train.toy import write_toy_corpus

N_CCRES = 250


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("fe_ft")
    corpus = write_toy_corpus(tmp / "corpus", n_cells=120, n_ccres=N_CCRES, n_types=3, seed=2, shard_size=70)
    torch.manual_seed(0)
    model = from_config(EpiAgentConfig.preset("tiny", n_ccres=N_CCRES))
    ckpt = save_epiagent_checkpoint(model, tmp / "checkpoint.pth", write_config=True)
    return tmp, corpus, model, ckpt


def test_zero_shot_matches_embed_and_caller_model_is_untouched(toy):
    _, corpus, model, _ = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = finetune_embeddings(model, corpus, epochs=1, lr=1e-3, device="cpu", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy was trained
    z = embed_cells(model.eval(), corpus, device="cpu")
    np.testing.assert_allclose(res["zero_shot"], z, atol=1e-5)  # what `epiflow embed` gives
    assert res["finetuned"].shape == z.shape == (120, model.config.dim)
    assert np.isfinite(res["finetuned"]).all()
    assert np.abs(res["finetuned"] - z).max() > 1e-3  # fine-tuning changed the encoder
    assert res["epochs"] == 1 and res["steps"] >= 1 and res["seconds"] > 0


def test_finetuning_lowers_cca_sr_loss_and_is_reproducible(toy):
    _, corpus, model, _ = toy
    kw = dict(epochs=3, lr=1e-3, device="cpu", progress=False, seed=3)
    a = finetune_embeddings(model, corpus, **kw)
    hist = a["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3] and {"cca", "sr"} <= set(hist[0])
    assert hist[-1]["cca"] + hist[-1]["sr"] < hist[0]["cca"] + hist[0]["sr"]  # observed 14.6 -> 12.2
    b = finetune_embeddings(model, corpus, **kw)
    np.testing.assert_allclose(a["finetuned"], b["finetuned"], atol=1e-5)


def test_epochs_zero_is_zero_shot_only(toy):
    _, corpus, model, ckpt = toy
    res = finetune_embeddings(ckpt, corpus, epochs=0, device="cpu")
    assert res["finetuned"] is None and res["steps"] == 0 and res["history"] == []
    np.testing.assert_allclose(res["zero_shot"], embed_cells(model.eval(), corpus, device="cpu"), atol=1e-5)


def test_errors(toy):
    _, corpus, model, _ = toy
    with pytest.raises(ConfigError, match="epochs"):
        finetune_embeddings(model, corpus, epochs=-1)
    with pytest.raises(ConfigError, match="learning rate"):
        finetune_embeddings(model, corpus, epochs=1, lr=0)
    with pytest.raises(ConfigError, match="nothing to compute"):
        finetune_embeddings(model, corpus, epochs=0, zero_shot=False)
    headless = from_config(EpiAgentConfig.preset("tiny", n_ccres=N_CCRES, pretrain_heads=False))
    with pytest.raises(ConfigError, match="CCA \\+ SR"):
        finetune_embeddings(headless, corpus, epochs=1, device="cpu")
    # zero-shot works without the pretraining heads
    assert finetune_embeddings(headless, corpus, epochs=0, device="cpu")["zero_shot"].shape[0] == 120


def test_add_model_embeddings_rows_and_keys(toy):
    _, corpus, model, _ = toy
    adata, methods, _, cells = load_feature_inputs(corpus=corpus, lsi_components=10, return_cells=True)
    assert cells.n_cells == adata.n_obs == 120
    np.testing.assert_array_equal(cells.obs["cell_id"].to_numpy(), adata.obs["cell_id"].to_numpy())
    added, rows = add_model_embeddings(adata, cells, model, dataset="toy", epochs=1, lr=1e-3, device="cpu",
                                       progress=False)
    assert added == {"EpiAgent": ZEROSHOT_KEY, FINETUNED_METHOD: FINETUNED_KEY}
    assert adata.obsm[ZEROSHOT_KEY].shape == adata.obsm[FINETUNED_KEY].shape == (120, model.config.dim)
    t = pd.DataFrame(rows).set_index(["method", "metric"])["value"]
    assert t["EpiAgent", "finetune_epochs"] == 0 and t[FINETUNED_METHOD, "finetune_epochs"] == 1
    assert t[FINETUNED_METHOD, "finetune_steps"] >= 1
    assert np.isfinite(t[FINETUNED_METHOD, "finetune_loss_first"])
    assert set(pd.DataFrame(rows)["task"]) == {"feature_extraction"}
    # a given zero-shot embedding is kept, not recomputed
    adata.obsm[ZEROSHOT_KEY] = np.ones_like(adata.obsm[ZEROSHOT_KEY])
    added, _ = add_model_embeddings(adata, cells, model, dataset="toy", epochs=1, lr=1e-3, device="cpu",
                                    progress=False)
    assert added == {FINETUNED_METHOD: FINETUNED_KEY} and (adata.obsm[ZEROSHOT_KEY] == 1).all()
    with pytest.raises(ConfigError, match="cells to embed"):
        add_model_embeddings(adata[:10].copy(), cells, model, dataset="toy", epochs=1)


def test_cli_finetuned_beside_zero_shot_and_lsi_with_trajectory(toy, capsys):
    tmp, corpus, _, ckpt = toy
    out = tmp / "cli_ft"
    rc = main(["evaluate-features", "--corpus", str(corpus), "--checkpoint", str(ckpt), "--epochs", "1",
               "--lr", "1e-3", "--device", "cpu", "--no-progress", "--lsi-components", "10",
               "--n-neighbors", "10", "--trajectory", "--root-type", "type0", "--order", "type0 < type1 < type2",
               "--out", str(out)])
    assert rc == 0
    # the files the command wrote before the settings refactoring (#18), no more, no fewer (paga.tsv:
    # since #21, for panel fig2e)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metrics.tsv", "cells.tsv", "trajectory.tsv", "paga.tsv", "umap.png", "umap_EpiAgent.png",
         f"umap_{FINETUNED_METHOD}.png", "umap_LSI.png", "trajectory.png"])
    t = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert list(dict.fromkeys(t["method"])) == ["EpiAgent", FINETUNED_METHOD, "LSI"]
    v = t.set_index(["task", "method", "metric"])["value"]
    for m in ("EpiAgent", FINETUNED_METHOD, "LSI"):
        assert 0 <= v["feature_extraction", m, "NMI"] <= 1
        assert v["feature_extraction", m, "n_cells"] == 120
        # the trajectory ran on every embedding, EpiAgent ones included
        assert {f"mean_pseudotime[type{i}]" for i in range(3)} <= set(t[(t["task"] == "trajectory")
                                                                           & (t["method"] == m)]["metric"])
    for m in ("EpiAgent", FINETUNED_METHOD):  # the tiny model's kNN graph joins the types
        assert np.isfinite(v["trajectory", m, "spearman_types"]) and v["trajectory", m, "n_cells_unreachable"] == 0
        assert v["trajectory", m, "mean_pseudotime[type0]"] < v["trajectory", m, "mean_pseudotime[type1]"]
    # LSI separates the toy types into kNN components: only the root's component gets a pseudotime
    assert v["trajectory", "LSI", "n_cells_unreachable"] > 0 and np.isnan(v["trajectory", "LSI", "spearman_types"])
    assert v["feature_extraction", FINETUNED_METHOD, "finetune_epochs"] == 1
    assert v["feature_extraction", "EpiAgent", "finetune_epochs"] == 0
    assert v["feature_extraction", "LSI", "NMI"] > 0.9  # separable synthetic types
    traj = pd.read_csv(out / "trajectory.tsv", sep="\t")
    assert set(traj["method"]) == {"EpiAgent", FINETUNED_METHOD, "LSI"} and len(traj) == 9
    paga = pd.read_csv(out / "paga.tsv", sep="\t")  # one row per method and pair of the 3 types
    assert len(paga) == 9 and set(paga["method"]) == {"EpiAgent", FINETUNED_METHOD, "LSI"}
    assert paga["connectivity"].between(0, 1).all()
    cells = pd.read_csv(out / "cells.tsv", sep="\t")
    assert {"pseudotime_EpiAgent", f"pseudotime_{FINETUNED_METHOD}", "leiden_EpiAgent-finetuned"} <= set(cells)
    for f in ("umap_EpiAgent.png", f"umap_{FINETUNED_METHOD}.png", "umap_LSI.png", "trajectory.png"):
        assert (out / f).exists(), f
    assert FINETUNED_METHOD in capsys.readouterr().out


def test_cli_given_zero_shot_file_is_used_and_errors(toy, capsys):
    import anndata as ad

    tmp, corpus, model, ckpt = toy
    shard = load_cells(corpus)
    e = ad.AnnData(obs=shard.obs.astype(str).set_index(shard.obs["cell_id"].astype(str).to_numpy()))
    y = shard.obs["cell_type"].str[-1].astype(int).to_numpy()
    e.obsm["X_epiagent"] = (np.eye(8)[y] * 50 + np.random.default_rng(0).normal(size=(len(y), 8))).astype(
        np.float32)
    e.write_h5ad(tmp / "zs.h5ad")
    out = tmp / "cli_given"
    assert main(["evaluate-features", "--embeddings", str(tmp / "zs.h5ad"), "--corpus", str(corpus),
                 "--checkpoint", str(ckpt), "--finetune-epochs", "1", "--device", "cpu", "--no-progress",
                 "--lsi-components", "10", "--n-neighbors", "10", "--no-umap", "--out-dir", str(out)]) == 0
    v = pd.read_csv(out / "metrics.tsv", sep="\t").set_index(["method", "metric"])["value"]
    assert v["EpiAgent", "n_dims"] == 8 and v["EpiAgent", "NMI"] == pytest.approx(1.0)  # the file's blobs
    assert v[FINETUNED_METHOD, "n_dims"] == model.config.dim
    capsys.readouterr()
    assert main(["evaluate-features", "--corpus", str(corpus), "--finetune-epochs", "1",
                 "--out-dir", str(tmp / "e1")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    counts = tmp / "counts.h5ad"
    a = shard.to_anndata()
    a.write_h5ad(counts)
    assert main(["evaluate-features", "--counts", str(counts), "--checkpoint", str(ckpt),
                 "--out-dir", str(tmp / "e2")]) == 2
    assert "--corpus" in capsys.readouterr().err
    assert main(["evaluate-features", "--corpus", str(corpus), "--checkpoint", str(ckpt), "--finetune-epochs",
                 "-1", "--out-dir", str(tmp / "e3")]) == 2
    assert "epochs" in capsys.readouterr().err
    assert main(["evaluate-features", "--corpus", str(corpus), "--counts", str(counts),
                 "--out-dir", str(tmp / "e4")]) == 2
    assert "--counts" in capsys.readouterr().err


def test_run_with_a_model_equals_the_cli(toy):
    """run(adata, cfg, model=, cells=) computes the EpiAgent embeddings itself (zero-shot + fine-tuned,
    LSI rows last) and returns the tables the CLI writes; nothing is written and the model is untouched."""
    tmp, corpus, model, _ = toy
    adata, methods, info, cells = load_feature_inputs(corpus=corpus, lsi_components=10, return_cells=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FeaturesConfig(epochs=1, lr=1e-3, device="cpu", progress=False, n_neighbors=10, umap=False)
    res = run(adata, cfg, embeddings=methods, model=model, cells=cells, lsi_info=info)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    t = res.metrics
    assert list(dict.fromkeys(t["method"])) == ["EpiAgent", FINETUNED_METHOD, "LSI"]
    assert {"lsi_depth_spearman", "lsi_dropped_first"} <= set(t[t["method"] == "LSI"]["metric"])
    assert set(res.tables) == {"cells"} and len(res.tables["cells"]) == 120
    assert res.data["umap_panels"] == {} and res.data["dataset"] == "toy"
    with pytest.raises(ConfigError, match="sentences"):
        run(adata, cfg, embeddings=methods, model=model)
