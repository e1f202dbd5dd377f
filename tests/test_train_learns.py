"""End-to-end pretraining on a small structured corpus: it learns (held-out CCA AUROC >= 0.8 on CPU
within about ten seconds), writes every output, and the memory-lean mode trains too."""

import importlib.util
import json

import pandas as pd
import pytest
import torch

from epiflow.train.pretrain import PretrainConfig, pretrain
from epiflow.train.toy import write_toy_corpus

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_toy_corpus(tmp_path_factory.mktemp("learn") / "corpus", n_cells=300, n_ccres=600,
                            n_types=4, seed=1, shard_size=100)


@pytest.mark.slow  # ~380 steps: a full (small) pretraining run
def test_pretraining_learns_cca_on_held_out_cells(corpus, tmp_path):
    out = tmp_path / "run"
    s = pretrain(corpus, out, PretrainConfig(model_config="tiny", epochs=6, rlm_epochs=1, lr=3e-3,
                                             batch_tokens=1024, eval_fraction=0.1, ckpt_every=0, seed=0,
                                             progress=False))
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n_cells"] == 30 and ev["positives"] * 2 == ev["n_queries"]
    assert ev["cca_auroc"] >= 0.8, ev
    # outputs
    m = pd.read_csv(out / "metrics.csv")
    assert list(m["step"]) == list(range(1, s["steps"] + 1))
    assert set(m["k"]) == {1, 2, 5} and m.loc[m["epoch"] == 1, "rlm_loss"].notna().all()
    assert m.loc[m["epoch"] > 1, "rlm_loss"].isna().all()
    assert (m["tokens_per_s"] > 0).all() and (m["mem_mb"] > 0).all()
    assert m["sr"].iloc[-10:].mean() < m["sr"].iloc[:10].mean()
    assert (out / "loss.png").stat().st_size > 1000
    cfg = json.loads((out / "model_config.json").read_text())
    assert cfg["num_heads"] == 4 and cfg["n_ccres"] == 600 and cfg["vocab_id"]
    from epiflow.model import load_epiagent_checkpoint

    model = load_epiagent_checkpoint(out / "checkpoint.pth", num_heads=cfg["num_heads"])
    sd = torch.load(out / "checkpoint.pth", weights_only=True)
    assert list(sd)[0] == "cCRE_embedding.weight" and sd["signal_decoder.weight"].shape == (600, 64)
    assert float(sd["criterion_CCA.pos_weight"]) == 5.0  # K of the last block
    assert model.n_ccres == 600


def test_memory_lean_mode_trains_and_keeps_small_states(corpus, tmp_path):
    out = tmp_path / "lean"
    s = pretrain(corpus, out, PretrainConfig(model_config="tiny", epochs=4, rlm_epochs=1, lr=3e-3,
                                             batch_tokens=1024, eval_fraction=0.1, ckpt_every=0, seed=0,
                                             memory_lean=True, lean_chunk=128, k_schedule=(1,),
                                             progress=False))
    m = pd.read_csv(out / "metrics.csv")
    assert m["cca"].iloc[-10:].mean() < m["cca"].iloc[:10].mean() - 0.05
    assert m["sr"].iloc[-5:].mean() < m["sr"].iloc[:5].mean()
    st = torch.load(out / "train_state.pt", weights_only=False)
    assert st["lean"]["emb"]["v"].shape == (604,) and st["lean"]["dec"]["v"].shape == (600,)
    assert st["lean"]["emb"]["m"] is None
    # the dense optimiser holds no state for the two tables
    n_dense = sum(v["exp_avg"].numel() for v in st["optimizer"]["state"].values())
    assert n_dense == sum(t.numel() for k, t in st["model"].items()
                          if not k.startswith("criterion") and k not in
                          ("cCRE_embedding.weight", "signal_decoder.weight"))
    assert s["eval"]["cca_auroc"] > 0.7


def test_cli_pretrain_and_bad_resume(corpus, tmp_path, capsys):
    from epiflow.cli import main

    out = tmp_path / "cli"
    args = ["pretrain", "--corpus", str(corpus), "--out", str(out), "--max-steps", "3", "--epochs", "1",
            "--batch-tokens", "512", "--no-progress", "--k-schedule", "1", "--rlm-epochs", "0"]
    tb = importlib.util.find_spec("tensorboard") is not None
    assert main(args + (["--tensorboard"] if tb else [])) == 0
    if tb:
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3
    # resuming with a different data order is refused with a clear message
    assert main(args + ["--resume", "--seed", "9"]) == 2
    err = capsys.readouterr().err
    assert "seed 0 -> 9" in err and "Fix:" in err
    assert main(["pretrain", "--corpus", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "corpus.json not found" in capsys.readouterr().err
    assert main(["pretrain-launch", "--dry-run", "--nproc-per-node", "2", "--", "--corpus", "C", "--out", "O"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("torchrun ") and "--rdzv_backend=c10d" in line and "pretrain --corpus C" in line
