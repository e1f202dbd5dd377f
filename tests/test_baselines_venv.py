"""The virtual-environment path for real: each tool's env is built from envs/baseline-<tool>.yaml
(once; cached under $EPIFLOW_ENV_CACHE, default ~/.cache/epiflow/envs) and the adapter runs with that
env's Python in a subprocess (h5ad in, npz out).

Cold (nothing cached) these build five environments (the scvi-tools one is ~1.8 GB); warm they only
run the adapters. Skipped only when an env is not cached and pip cannot reach the package index.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from epiflow.baselines import venv
from epiflow.baselines.run import canonical_input, evaluate, run_baseline

from test_baselines import synthetic  # noqa: E402 (tests/ is on sys.path)

pytestmark = pytest.mark.slow

_INDEX_OK: dict[str, bool] = {}


def need_env(tool: str):
    spec = venv.read_env_spec(tool)
    if (spec.env_dir(venv.default_cache()) / "epiflow-env.json").exists():
        return
    if "ok" not in _INDEX_OK:
        _INDEX_OK["ok"] = venv.pip_index_reachable()
    if not _INDEX_OK["ok"]:
        pytest.skip(f"the {tool} environment is not cached and pip cannot reach the package index")


@pytest.fixture(scope="module")
def adata():
    return synthetic()


def _run(adata, tool, task, params):
    need_env(tool)
    inp, ctx = canonical_input(adata, task)
    out = run_baseline(tool, inp, task, params, env="venv", threads=1)
    assert out.info["env_mode"] == "venv"
    env = venv.read_env_spec(tool).env_dir(venv.default_cache())
    assert out.info["env"] == str(env)
    return out, {r["metric"]: r["value"] for r in evaluate(out, inp, ctx, dataset="syn", method=tool)}


def test_env_is_isolated_and_cached():
    need_env("lsi")
    env = venv.ensure_env("lsi")
    again = venv.ensure_env("lsi")
    assert again == env and venv.env_info(env)["tool"] == "lsi"
    py = venv.env_python(env)
    # its own site-packages: no scanpy / torch from the main environment
    r = subprocess.run([str(py), "-c", "import importlib.util as u, json, sys; "
                        "print(json.dumps([u.find_spec(m) is not None for m in ('scanpy', 'torch', 'sklearn')]))"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert json.loads(r.stdout) == [False, False, True], r.stderr


def test_lsi_in_venv_matches_inprocess(adata):
    out, m = _run(adata, "lsi", "feature_extraction", {"n_components": 10})
    inp, _ = canonical_input(adata, "feature_extraction")
    ref = run_baseline("lsi", inp, "feature_extraction", {"n_components": 10}, env="inprocess")
    # same code, same seed; different BLAS builds may differ in the last digits and in sign
    np.testing.assert_allclose(np.abs(out.embedding), np.abs(ref.embedding), rtol=1e-3, atol=1e-3)
    assert m["ARI"] > 0.9


def test_lda_in_venv(adata):
    _, m = _run(adata, "lda", "feature_extraction", {"n_topics": 8, "max_iter": 20})
    assert m["ARI"] > 0.8


def test_pca_svm_in_venv(adata):
    _, m = _run(adata, "pca_svm", "annotation", {"n_components": 10})
    assert m["accuracy"] > 0.9


def test_harmony_in_venv_mixes_batches(adata):
    inp, ctx = canonical_input(adata, "integration")
    base = run_baseline("pca", inp, "integration", {"n_components": 10}, env="inprocess")
    base_m = {r["metric"]: r["value"] for r in evaluate(base, inp, ctx, dataset="syn", method="PCA")}
    _, m = _run(adata, "harmony", "integration", {"n_components": 10})
    assert m["iLISI"] > base_m["iLISI"] + 0.1 and m["ARI"] > 0.8


def test_peakvi_in_venv(adata):
    out, m = _run(adata, "peakvi", "integration", {"max_epochs": 2, "n_latent": 5, "batch_size": 32})
    assert out.embedding.shape == (adata.n_obs, 5)
    assert out.info["epochs_run"] == 2 and out.info["batch_key"] == "batch"
    assert np.isfinite(m["NMI"])
