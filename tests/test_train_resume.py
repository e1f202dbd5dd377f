"""Exact resume: a run SIGKILLed after a checkpoint and resumed ends with the same weights, bit for
bit, as an uninterrupted run (CPU, subprocesses of the real CLI)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from epiflow.train.toy import write_toy_corpus

ROOT = Path(__file__).resolve().parents[1]


def _cmd(corpus, out, extra=()):
    return [sys.executable, "-m", "epiflow", "pretrain", "--corpus", str(corpus), "--out", str(out),
            "--epochs", "2", "--rlm-epochs", "1", "--max-steps", "10", "--batch-tokens", "768",
            "--ckpt-every", "3", "--lr", "2e-3", "--seed", "3", "--no-progress", "--grad-accum", "2", *extra]


def _env(delay=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    if delay:
        env["EPIFLOW_TRAIN_STEP_DELAY"] = str(delay)
    return env


def _state_step(path):
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
    except Exception:
        return -1


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path):
    corpus = write_toy_corpus(tmp_path / "corpus", n_cells=160, n_ccres=300, seed=4, shard_size=60)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(corpus, full), check=True, env=_env(), capture_output=True, timeout=300)

    proc = subprocess.Popen(_cmd(corpus, killed), env=_env(delay=0.4), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (killed / "train_state.pt").exists() and _state_step(killed / "train_state.pt") >= 3:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    step_at_kill = _state_step(killed / "train_state.pt")
    assert 3 <= step_at_kill < 10  # killed mid-way, after a checkpoint
    assert not (killed / "eval.json").exists()

    subprocess.run(_cmd(corpus, killed, ["--resume"]), check=True, env=_env(), capture_output=True, timeout=300)
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(killed / "checkpoint.pth", weights_only=True)
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(full / "train_state.pt", weights_only=False)
    sb = torch.load(killed / "train_state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 10
    assert sa["scheduler"] == sb["scheduler"]
    # metrics.csv of the resumed run has every step exactly once and the same losses
    import pandas as pd

    ma, mb = pd.read_csv(full / "metrics.csv"), pd.read_csv(killed / "metrics.csv")
    assert list(mb["step"]) == list(range(1, 11))
    assert ma["loss"].tolist() == mb["loss"].tolist()
