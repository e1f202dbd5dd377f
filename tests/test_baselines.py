"""Baselines: gene activity, feature selections, the adapter interface, in-process adapters, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from epiflow.baselines import base, preprocess, venv
from epiflow.baselines.run import canonical_input, evaluate, load_counts, run_baseline
from epiflow.errors import ConfigError, EpiflowError, InputFormatError


def synthetic(n_per=30, n_types=3, n_feat=240, seed=0):
    """Cells of ``n_types`` types, each with its own block of open features; batch b1 has an extra
    open block (a batch effect); features on chr1/chr2 at 5 kb spacing."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    n = n_per * n_types
    lab = np.repeat(np.arange(n_types), n_per)
    p = np.tile(rng.uniform(0.02, 0.08, n_feat), (n_types, 1))
    blk = n_feat // (2 * n_types)
    for t in range(n_types):
        p[t, t * blk:(t + 1) * blk] = 0.7
    batch = rng.integers(0, 2, n)
    prob = p[lab]
    prob[batch == 1, -blk:] += 0.4
    x = (rng.random((n, n_feat)) < np.clip(prob, 0, 1)).astype(np.float32)
    x[x.sum(1) == 0, 0] = 1
    obs = pd.DataFrame({"cell_type": [f"T{t}" for t in lab], "batch": [f"b{b}" for b in batch], "dataset": "syn"},
                       index=[f"c{i}" for i in range(n)])
    starts = np.arange(n_feat) * 5000 + 10_000
    var = pd.DataFrame({"chrom": np.where(np.arange(n_feat) < n_feat // 2, "chr1", "chr2"), "start": starts,
                        "end": starts + 500})
    var.index = (var["chrom"] + ":" + var["start"].astype(str) + "-" + var["end"].astype(str)).to_numpy()
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)


def synthetic_genetic(tmp_path=None, n_ctrl=60, n_per=15, n_feat=200, seed=0):
    """Genetic perturbations of 8 genes G1..G8 in 4 GO modules (G1/G2 share GO:1, G3/G4 GO:2, ...);
    a perturbation of a gene of module m opens feature block m (and its own smaller block).
    Returns (AnnData with obs 'perturbation', path of a gene_symbol/go_id table or None)."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(1, 9)]
    lab = ["control"] * n_ctrl + [g for g in genes for _ in range(n_per)]
    p = np.tile(rng.uniform(0.05, 0.15, n_feat), (len(lab), 1))
    blk = 20
    for r, g in enumerate(lab):
        if g == "control":
            continue
        i = int(g[1:]) - 1
        m = i // 2
        p[r, m * blk:(m + 1) * blk] = 0.8
        p[r, 100 + i * 5:100 + (i + 1) * 5] = 0.6
    x = (rng.random(p.shape) < p).astype(np.float32)
    obs = pd.DataFrame({"perturbation": lab, "cell_type": "K562", "dataset": "gen"},
                       index=[f"g{i}" for i in range(len(lab))])
    starts = np.arange(n_feat) * 5000 + 10_000
    var = pd.DataFrame({"chrom": "chr1", "start": starts, "end": starts + 500})
    var.index = ("chr1:" + var["start"].astype(str) + "-" + var["end"].astype(str)).to_numpy()
    go = None
    if tmp_path is not None:
        rows = [(g, f"GO:{int(g[1:]) - 1 >> 1:07d}") for g in genes] + [(g, "GO:0009999") for g in genes[:2]]
        rows += [(f"X{j}", f"GO:{j % 4:07d}") for j in range(6)]  # unperturbed annotated genes
        go = tmp_path / "go.tsv"
        pd.DataFrame(rows, columns=["gene_symbol", "go_id"]).to_csv(go, sep="\t", index=False)
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var), go


@pytest.fixture(scope="module")
def adata():
    return synthetic()


def genes_bed(tmp_path, var):
    """One '+' gene per 4 consecutive features (body = the 4 features' span minus the first 2 kb)."""
    rows = []
    for g, i in enumerate(range(0, len(var), 4)):
        chrom = var["chrom"].iloc[i]
        if var["chrom"].iloc[min(i + 3, len(var) - 1)] != chrom:
            continue
        rows.append((chrom, int(var["start"].iloc[i]) + 2000, int(var["end"].iloc[min(i + 3, len(var) - 1)]),
                     f"G{g}", ".", "+"))
    p = tmp_path / "genes.bed"
    pd.DataFrame(rows).to_csv(p, sep="\t", header=False, index=False)
    return p


# ----------------------------------------------------------------------------- preprocessing
def test_gene_activity_strand_aware(tmp_path):
    genes = pd.DataFrame({"chrom": ["chr1", "chr1", "chr2"], "start": [10_000, 30_000, 100],
                          "end": [20_000, 40_000, 200], "name": ["P", "M", "Q"], "strand": ["+", "-", "+"]})
    # feature 0 is 1.5 kb upstream of P (+ strand: before start), feature 1 is 1.5 kb upstream of M
    # (- strand: after end), feature 2 lies 3 kb upstream of P (outside), feature 3 downstream of M's
    # TES (before its start: outside), feature 4 in P's body
    feats = pd.DataFrame({"chrom": ["chr1"] * 5, "start": [8_400, 41_400, 6_900, 29_000, 15_000],
                          "end": [8_600, 41_600, 7_100, 29_500, 15_100]})
    counts = sp.csr_matrix(np.array([[1, 0, 5, 1, 2], [0, 3, 1, 1, 0]], dtype=np.float32))
    ga, names = preprocess.gene_activity(counts, feats, genes, upstream=2000)
    assert list(names) == ["M", "P"]  # Q overlaps nothing and is dropped
    # binarised: P = features 0 and 4; M = feature 1
    np.testing.assert_array_equal(ga.toarray(), [[0, 2], [1, 0]])
    ga2, _ = preprocess.gene_activity(counts, feats, genes, upstream=2000, binarize=False)
    np.testing.assert_array_equal(ga2.toarray(), [[0, 3], [3, 0]])
    # with no upstream extension the upstream features drop out
    ga3, names3 = preprocess.gene_activity(counts, feats, genes, upstream=0)
    assert list(names3) == ["P"] and ga3.toarray().ravel().tolist() == [1, 0]


def test_gene_file_errors(tmp_path):
    p = tmp_path / "g.bed"
    p.write_text("chr1\t1\t100\n")
    with pytest.raises(InputFormatError, match="BED6"):
        preprocess.read_genes(p)
    p.write_text("chr1\t1\t100\tA\t.\t+\nchr1\t1\t100\tB\t.\tx\n")
    with pytest.raises(InputFormatError, match="line 2"):
        preprocess.read_genes(p)
    with pytest.raises(InputFormatError, match="does not exist"):
        preprocess.read_genes(tmp_path / "missing.bed")
    p.write_text("chr1\t1\t100\tA\t.\t+\nchr1\tone\t100\tB\t.\t+\n")
    with pytest.raises(InputFormatError, match="g.bed.*BED6"):
        preprocess.read_genes(p)
    import gzip

    gz = tmp_path / "g.bed.gz"
    gz.write_bytes(gzip.compress("".join(f"chr1\t{i}\t{i + 9}\tG{i}\t.\t+\n" for i in range(5000)).encode())[:3000])
    with pytest.raises(InputFormatError, match="g.bed.gz.*truncated or not gzip"):
        preprocess.read_genes(gz)


def test_feature_selections():
    x = sp.csr_matrix(np.array([[1, 0, 2, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float32))
    np.testing.assert_array_equal(preprocess.accessible_cells(x), [3, 1, 3, 0])
    np.testing.assert_array_equal(preprocess.top_accessible(x, 2), [0, 2])
    np.testing.assert_array_equal(preprocess.top_accessible(x, 10), [0, 1, 2, 3])
    ln = preprocess.log_normalise(x).toarray()
    np.testing.assert_allclose(ln[0], [np.log1p(5000), 0, np.log1p(5000), 0], rtol=1e-6)


def test_feature_coords_from_names(adata):
    a = adata.copy()
    a.var = pd.DataFrame(index=a.var_names)
    c = preprocess.feature_coords(a.var)
    assert c["start"].iloc[1] == 15_000 and c["chrom"].iloc[-1] == "chr2"
    assert preprocess.feature_coords(pd.DataFrame(index=["a", "b"])) is None


# ----------------------------------------------------------------------------- interface
def test_registry_entries_and_env_files():
    for tool, spec in base.REGISTRY.items():
        assert callable(spec.load()), tool
        assert set(spec.tasks) <= set(base.TASKS)
        assert venv.env_file(tool).exists(), f"envs/baseline-{tool}.yaml missing"
        s = venv.read_env_spec(tool)
        assert s.pip and len(s.digest) == 12
        if spec.pypi:  # the tool is in the pip list or installed by the post-deploy script
            post = s.post_deploy.read_text() if s.post_deploy else ""
            assert any(venv._req_name(r) == spec.pypi for r in s.pip) or spec.pypi in post, tool
    assert "harmony" in base.tools_for("integration") and "pca_svm" in base.tools_for("annotation")
    with pytest.raises(EpiflowError, match="unknown baseline"):
        base.get_adapter("nope")
    with pytest.raises(EpiflowError, match="does not do"):
        base.get_adapter("harmony", "annotation")


def test_env_spec_rules(tmp_path):
    (tmp_path / "baseline-x.yaml").write_text("dependencies:\n  - python =3.11\n  - pip:\n      - torch>=2\n")
    with pytest.raises(ConfigError, match="torch must be pinned"):
        venv.read_env_spec("x", tmp_path)
    (tmp_path / "baseline-x.yaml").write_text("dependencies:\n  - python =3.11\n")
    with pytest.raises(ConfigError, match="pip"):
        venv.read_env_spec("x", tmp_path)
    (tmp_path / "baseline-x.yaml").write_text("dependencies:\n  - pip:\n      - torch==2.13.0\n      - numpy\n")
    s1 = venv.read_env_spec("x", tmp_path)
    assert s1.needs_torch and s1.pip == ("torch==2.13.0", "numpy")
    (tmp_path / "baseline-x.yaml").write_text("dependencies:\n  - pip:\n      - numpy\n")
    s2 = venv.read_env_spec("x", tmp_path)
    assert not s2.needs_torch and s2.digest != s1.digest
    with pytest.raises(ConfigError, match="no environment file"):
        venv.read_env_spec("missing", tmp_path)


def test_post_deploy_script_runs_in_the_env(tmp_path, monkeypatch):
    """envs/baseline-<tool>.post-deploy.sh (Snakemake's conda post-deploy script) also runs in the
    venv build: env's python first on PATH, $EPIFLOW_PIP installing into the env; it is part of the
    env's hash; a failing script leaves nothing in the cache."""
    envs = tmp_path / "envs"
    envs.mkdir()
    (envs / "baseline-x.yaml").write_text("dependencies:\n  - pip:\n      - numpy\n")
    s0 = venv.read_env_spec("x", envs)
    assert s0.post_deploy is None
    script = envs / "baseline-x.post-deploy.sh"
    script.write_text('set -eu\necho "$EPIFLOW_PIP" > "$VIRTUAL_ENV/pip.txt"\n'
                      'command -v python > "$VIRTUAL_ENV/python.txt"\n')
    s1 = venv.read_env_spec("x", envs)
    assert s1.post_deploy == script and s1.digest != s0.digest
    calls = []
    monkeypatch.setattr(venv, "_pip", lambda py, args, fh, timeout: calls.append(list(args)))
    env = venv.ensure_env("x", cache=tmp_path / "cache", envs_dir=envs)
    assert calls == [["numpy"]] and env.name == f"x-{s1.digest}"
    pip_cmd = (env / "pip.txt").read_text().split()
    assert pip_cmd[1:4] == ["-m", "pip", "--python"] and pip_cmd[4].endswith("/bin/python")
    assert (env / "python.txt").read_text().strip() == pip_cmd[4]  # the env's python is first on PATH
    assert venv.env_info(env)["post_deploy"] == str(script)
    script.write_text("exit 3\n")
    with pytest.raises(EpiflowError, match="post-deploy.sh failed"):
        venv.ensure_env("x", cache=tmp_path / "cache", envs_dir=envs)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == [env.name]


def test_env_installs_its_lock_with_hashes(tmp_path, monkeypatch):
    """With envs/baseline-<tool>.lock.txt beside the yaml the venv builder installs the lock
    (--require-hashes --no-deps), then torch==2.13.0 when listed; the lock is part of the env's hash."""
    envs = tmp_path / "envs"
    envs.mkdir()
    (envs / "baseline-x.yaml").write_text("dependencies:\n  - pip:\n      - torch==2.13.0\n      - numpy==2.4.6\n")
    s0 = venv.read_env_spec("x", envs)
    assert s0.lock is None
    lock = envs / "baseline-x.lock.txt"
    lock.write_text("numpy==2.4.6 --hash=sha256:" + "0" * 64 + "\n")
    s1 = venv.read_env_spec("x", envs)
    assert s1.lock == lock and s1.digest != s0.digest
    lock.write_text("numpy==2.4.6 --hash=sha256:" + "1" * 64 + "\n")
    assert venv.read_env_spec("x", envs).digest != s1.digest
    calls = []
    monkeypatch.setattr(venv, "_pip", lambda py, args, fh, timeout: calls.append(list(args)))
    env = venv.ensure_env("x", cache=tmp_path / "cache", envs_dir=envs)
    assert calls == [["--require-hashes", "--no-deps", "-r", str(lock)], ["torch==2.13.0"]]
    assert venv.env_info(env)["lock"] == str(lock)


def test_tool_process_has_a_pinned_hash_seed(tmp_path, monkeypatch, adata):
    """run_in_venv runs the tool with PYTHONHASHSEED pinned, whatever the caller's: SnapATAC2's
    mnc_correct orders the batches by list(set(labels)), so its integration changed from run to run."""
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    fake = env / "bin" / "python"  # stands in for the tool env's Python: reports the seed it was given
    fake.write_text('#!/bin/sh\necho "EPIFLOW-ERROR: hash seed [$PYTHONHASHSEED]" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setattr(venv, "ensure_env", lambda tool, **kw: env)
    for caller in ("random", "7", None):
        if caller is None:
            monkeypatch.delenv("PYTHONHASHSEED", raising=False)
        else:
            monkeypatch.setenv("PYTHONHASHSEED", caller)
        with pytest.raises(EpiflowError, match=r"hash seed \[0\]$"):
            venv.run_in_venv("lsi", adata[:20].copy(), "feature_extraction", {})


def test_shipped_env_files_are_locked():
    """Every envs/baseline-<tool>.yaml has its lock, and the yaml's pip list is the lock's exact
    versions (scripts/lock.sh writes both), so conda and venv builds install the same packages."""
    import re

    for tool in base.REGISTRY:
        spec = venv.read_env_spec(tool)
        assert spec.lock is not None, f"envs/baseline-{tool}.lock.txt missing: bash scripts/lock.sh {tool}"
        text = spec.lock.read_text()
        locked = set(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*==\S+?) \\$", text, flags=re.M))
        assert locked and text.count("--hash=sha256:") >= len(locked), tool
        assert {r for r in spec.pip if venv._req_name(r) != "torch"} == locked, tool
        assert all("==" in r for r in spec.pip), tool


def test_relative_path_params_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "genes.bed").write_text("x")
    monkeypatch.chdir(tmp_path)
    p = venv._absolute_paths({"genes": "genes.bed", "model": "MLP", "n": 3, "missing": "nope.bed"})
    assert p == {"genes": str(tmp_path / "genes.bed"), "model": "MLP", "n": 3, "missing": "nope.bed"}


def test_status_table_in_readme_matches_docs(tmp_path):
    """README.md's Baselines table is the copy of docs/baselines.md's, and it has a row for every
    registered tool and for the tools not on PyPI, with the required columns."""
    from epiflow.baselines import status

    root = status.repo_root()
    docs, readme = root / "docs" / "baselines.md", root / "README.md"
    assert status.check(docs, readme) == [], "run: python -m epiflow.baselines.status --write"
    rows = status.table_rows(status.block(docs.read_text()))
    assert rows[0] == status.COLUMNS
    names = " ".join(r[0] for r in rows[1:])
    for spec in base.REGISTRY.values():
        assert spec.method.split("-")[-1].split("+")[0].lower() in names.lower(), spec.method
    for name in base.NOT_ON_PYPI:
        assert name in names
    assert all(len(r) == len(status.COLUMNS) and all(r) for r in rows[1:])
    assert not any("pending" in c for r in rows for c in r)
    # the checker notices a difference, --write repairs it
    d, r = tmp_path / "d.md", tmp_path / "r.md"
    d.write_text(f"x\n{status.START}\n| a | b |\n{status.END}\n")
    r.write_text(f"# top\n{status.START}\n| a | c |\n{status.END}\ntail\n")
    assert status.check(d, r) and status.write_readme(d, r)
    assert status.check(d, r) == [] and r.read_text().startswith("# top") and r.read_text().endswith("tail\n")


def test_output_roundtrip_and_check(tmp_path):
    out = base.BaselineOutput(embedding=np.ones((3, 2), np.float32), labels=np.array(["a", "b", "a"]),
                              info={"x": np.int64(3), "y": [1.5]})
    base.save_output(out, tmp_path / "o.npz")
    back = base.load_output(tmp_path / "o.npz")
    np.testing.assert_array_equal(back.embedding, out.embedding)
    assert back.labels.tolist() == ["a", "b", "a"] and back.info == {"x": 3, "y": [1.5]}
    assert back.imputed is None
    with pytest.raises(EpiflowError, match="no 'imputed'"):
        back.check("imputation", 3)
    with pytest.raises(EpiflowError, match="2 rows for 3"):
        base.BaselineOutput(embedding=np.ones((2, 2))).check("integration", 3)
    with pytest.raises(EpiflowError, match="NaN"):
        base.BaselineOutput(embedding=np.full((3, 2), np.nan)).check("integration", 3)


def test_baselines_table_bad_input_is_clear(tmp_path, capsys):
    from epiflow.cli import main

    good = tmp_path / "a.tsv"
    good.write_text("task\tdataset\tmethod\tmetric\tvalue\nannotation\td\tLSI\taccuracy\t0.5\n")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    word = tmp_path / "w.tsv"
    word.write_text("task\tdataset\tmethod\tmetric\tvalue\nannotation\td\tLSI\taccuracy\tabc\n")
    out = tmp_path / "t.tsv"
    for bad, words in ((tmp_path / "missing.tsv", "No such file"), (empty, "cannot read metrics table"),
                       (word, "line 2")):
        assert main(["baselines-table", str(good), str(bad), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and words in err and "Fix:" in err, err
        assert not out.exists()
    assert main(["baselines-table", str(good), "--out", str(out)]) == 0
    assert pd.read_csv(out, sep="\t")["value"].tolist() == [0.5]


def test_split_is_epiagent_annotations_and_needs_no_torch(adata):
    """The baselines hold out the cells EpiAgent's annotation task holds out: one function, which a tool's
    own environment (no torch) imports."""
    import subprocess
    import sys

    from epiflow.baselines.run import stratified_split
    from epiflow.tasks.annotation import stratified_split as epiagent_split

    assert stratified_split is epiagent_split
    code = ("import sys; sys.modules['torch'] = None\n"  # any import of torch fails
            "from epiflow.baselines.run import stratified_split\n"
            "print(int(stratified_split(['a'] * 6 + ['b'] * 3, 1 / 3, 3).sum()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr[-2000:]


def test_canonical_input_per_task(adata):
    inp, ctx = canonical_input(adata, "annotation", seed=1)
    q = inp.obs["split"].to_numpy() == "query"
    assert 0.25 < q.mean() < 0.4
    assert (inp.obs["label"].to_numpy()[q] == "").all()  # query labels hidden from the adapter
    assert (ctx["truth"][~q] == inp.obs["label"].to_numpy()[~q]).all()
    inp, ctx = canonical_input(adata, "imputation", min_cell_fraction=0.2)
    assert inp.n_vars == len(ctx["features"]) < adata.n_vars
    a = adata.copy()
    a.obs["condition"] = np.where(np.arange(a.n_obs) % 2 == 0, "control", "stim")
    inp, ctx = canonical_input(a, "perturbation", holdout="T1", top_n=50)
    assert inp.n_vars == 50 and ctx["holdout"] == "T1"
    held = (inp.obs["label"] == "T1") & (inp.obs["condition"] == "perturbed")
    assert not held.any() and ctx["real_pert"].shape[0] == 15 and ctx["real_ctrl"].shape[0] == 15
    with pytest.raises(EpiflowError, match="batch"):
        canonical_input(adata, "integration", batch_key="donor")


# ----------------------------------------------------------------------------- in-process adapters
@pytest.mark.parametrize("tool,task,params,metric,floor", [
    ("lsi", "feature_extraction", {"n_components": 10}, "ARI", 0.9),
    ("lda", "feature_extraction", {"n_topics": 8, "max_iter": 20}, "ARI", 0.8),
    ("pca", "feature_extraction", {"n_components": 10}, "ARI", 0.9),
    ("pca_svm", "annotation", {"n_components": 10}, "accuracy", 0.9),
    ("mlp", "annotation", {"hidden": [32]}, "accuracy", 0.8),
])
def test_light_adapters_recover_types(adata, tool, task, params, metric, floor):
    inp, ctx = canonical_input(adata, task)
    out = run_baseline(tool, inp, task, params, env="inprocess")
    rows = {r["metric"]: r["value"] for r in evaluate(out, inp, ctx, dataset="syn", method=tool)}
    assert rows[metric] >= floor, rows
    assert rows["runtime_s"] > 0 and out.info["env_mode"] == "inprocess"


def test_pca_svm_on_gene_activity(adata, tmp_path):
    inp, ctx = canonical_input(adata, "annotation")
    out = run_baseline("pca_svm", inp, "annotation", {"genes": str(genes_bed(tmp_path, adata.var)),
                                                      "n_components": 8}, env="inprocess")
    assert out.info["input"] == "gene_activity" and 20 < out.info["n_genes"] <= 60
    q = ctx["is_query"]
    assert (out.labels[q] == ctx["truth"][q]).mean() > 0.85


def test_integration_scores_for_pca(adata):
    inp, ctx = canonical_input(adata, "integration")
    out = run_baseline("pca", inp, "integration", {"n_components": 10}, env="inprocess")
    rows = {r["metric"]: r["value"] for r in evaluate(out, inp, ctx, dataset="syn", method="PCA")}
    assert {"iLISI", "kBET", "NMI", "batch_ASW"} <= set(rows)


def test_paper_preprocessing_defaults():
    """Paper: top-50,000 most accessible cCREs for scGen / scPRAM / GEARS; cCREs open in >= 3 % of
    the cells for imputation -- the defaults of canonical_input and of the run-baseline CLI."""
    import anndata as ad
    import inspect

    from epiflow.baselines.cli import register

    rng = np.random.default_rng(0)
    n, f = 100, 60_000
    # feature j is open in a number of cells that decreases with j; 2 cells open per feature beyond 55,000
    nc = np.where(np.arange(f) < 55_000, 2 + (55_000 - np.arange(f)) // 5_000, 2)
    rows = np.concatenate([rng.choice(n, k, replace=False) for k in nc])
    cols = np.repeat(np.arange(f), nc)
    x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, f))
    obs = pd.DataFrame({"cell_type": np.where(np.arange(n) < 50, "A", "B"),
                        "condition": np.where(np.arange(n) % 2 == 0, "control", "stim")},
                       index=[f"c{i}" for i in range(n)])
    a = ad.AnnData(X=x, obs=obs)
    inp, ctx = canonical_input(a, "perturbation", holdout="A")
    assert inp.n_vars == 50_000
    np.testing.assert_array_equal(ctx["features"], np.arange(50_000))  # the 50,000 most accessible
    inp, ctx = canonical_input(a, "imputation")
    # 3 % of 100 cells = 3: features with >= 3 open cells are those < 55,000
    np.testing.assert_array_equal(ctx["features"], np.flatnonzero(nc >= 3))
    sig = inspect.signature(canonical_input).parameters
    assert sig["top_n"].default == 50_000 and sig["min_cell_fraction"].default == 0.03
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    args = sub.choices["run-baseline"].parse_args(["--tool", "scgen", "--task", "perturbation", "--counts", "x",
                                                   "--out-dir", "o"])
    assert args.top_n == 50_000 and args.min_cell_fraction == 0.03


def test_genetic_input_and_scores(tmp_path):
    from epiflow.tasks.perturbation import holdout_split

    a, _ = synthetic_genetic()
    a.obs.loc[a.obs_names[-2:], "perturbation"] = "G9"  # < 3 cells: ignored
    inp, ctx = canonical_input(a, "genetic", top_n=150)
    _, held = holdout_split([f"G{i}" for i in range(1, 9)], 0.25, 0)  # EpiAgent's own split
    assert ctx["heldout"] == held and list(inp.uns["heldout"]) == held and len(held) == 2
    assert inp.n_vars == 150 and not inp.obs["perturbation"].isin(held + ["G9"]).any()
    assert (inp.obs["perturbation"] == "control").sum() == 60
    # the real means of the held-out perturbations score well; the controls' mean does not
    real = np.stack([np.asarray(ctx["real_pert"][p].mean(0)).ravel() for p in held])
    ctrl = np.asarray(ctx["real_ctrl"].mean(0)).ravel()
    oracle = base.BaselineOutput(predicted=real, groups=np.asarray(held), info={"runtime_s": 1.0})
    nochange = base.BaselineOutput(predicted=np.stack([ctrl, ctrl]), groups=np.asarray(held))
    for o in (oracle, nochange):
        o.check("genetic", inp.n_obs)
    r1 = {r["metric"]: r["value"] for r in evaluate(oracle, inp, ctx, dataset="gen", method="oracle")}
    r0 = {r["metric"]: r["value"] for r in evaluate(nochange, inp, ctx, dataset="gen", method="none")}
    assert r1["pearson_top1000"] > 0.99 and r1["dir_acc@100"] > 0.9 and r1["n_heldout_perturbations"] == 2
    assert r0["dir_acc@100"] == pytest.approx(0.5) and f"pearson_top1000[{held[0]}]" in r1
    assert all(r["task"] == "genetic_perturbation" for r in evaluate(oracle, inp, ctx, dataset="gen", method="oracle"))
    with pytest.raises(EpiflowError, match="groups"):
        base.BaselineOutput(predicted=real).check("genetic", inp.n_obs)
    with pytest.raises(EpiflowError, match="not among"):
        canonical_input(a, "genetic", holdout="G1,GX")
    inp2, ctx2 = canonical_input(a, "genetic", holdout="G1,G3")
    assert ctx2["heldout"] == ["G1", "G3"]


def test_gears_coexpression_edges_match_dense():
    from epiflow.baselines.adapters.others import _gears_condition, coexpression_edges

    rng = np.random.default_rng(1)
    x = (rng.random((40, 30)) < 0.3).astype(np.float32)
    x[:, 5] = x[:, 4]  # a perfectly correlated pair
    e = coexpression_edges(x, threshold=0.2, k=3, block=7)
    c = np.abs(np.corrcoef(x.T))
    for t in range(30):  # the k + 1 largest |r| per feature above the threshold (ties: any of them)
        want = np.sort(c[t])[::-1][:4]
        want = want[want > 0.2]
        got = e.loc[e["target"] == t]
        np.testing.assert_allclose(np.sort(got["importance"].to_numpy())[::-1], want, rtol=1e-5)
        np.testing.assert_allclose(c[t, got["source"].to_numpy()], got["importance"], rtol=1e-5)
    assert {4, 5} <= set(e.loc[e["target"] == 5, "source"])
    assert _gears_condition("control", "control") == "ctrl" and _gears_condition("A", "control") == "A+ctrl"
    assert _gears_condition("A+B", "control") == "A+B"


# ----------------------------------------------------------------------------- CLI
def test_cli_run_baseline(adata, tmp_path):
    from epiflow.cli import main

    p = tmp_path / "counts.h5ad"
    adata.write_h5ad(p)
    od = tmp_path / "out"
    rc = main(["run-baseline", "--tool", "lsi", "--task", "feature_extraction", "--counts", str(p),
               "--param", "n_components=8", "--out-dir", str(od)])
    assert rc == 0
    m = pd.read_csv(od / "metrics.tsv", sep="\t")
    assert list(m.columns) == ["task", "dataset", "method", "metric", "value"]
    assert set(m["method"]) == {"LSI"} and set(m["dataset"]) == {"syn"}
    assert m.set_index("metric").loc["ARI", "value"] > 0.9
    info = json.loads((od / "info.json").read_text())
    assert info["params"]["n_components"] == 8 and info["env_mode"] == "inprocess"
    import anndata as ad

    e = ad.read_h5ad(od / "embedding.h5ad")
    assert e.obsm["X_lsi"].shape[0] == adata.n_obs
    rc = main(["run-baseline", "--tool", "mlp", "--task", "annotation", "--counts", str(p),
               "--out-dir", str(tmp_path / "ann"), "--param", "hidden=[16]"])
    assert rc == 0
    pred = pd.read_csv(tmp_path / "ann" / "predictions.tsv", sep="\t")
    assert set(pred["split"]) == {"reference", "query"}
    # a user error: exit 2, no output
    assert main(["run-baseline", "--tool", "harmony", "--task", "annotation", "--counts", str(p),
                 "--out-dir", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad" / "metrics.tsv").exists()


def test_load_counts_dataset_filter(adata, tmp_path):
    p = tmp_path / "c.h5ad"
    adata.write_h5ad(p)
    assert load_counts(counts=p, dataset="syn").n_obs == adata.n_obs
    with pytest.raises(EpiflowError, match="no cell of dataset"):
        load_counts(counts=p, dataset="other")
    two = adata.copy()
    two.obs["dataset"] = np.where(np.arange(two.n_obs) % 3 == 0, "a", np.where(np.arange(two.n_obs) % 3 == 1, "b", "c"))
    two.write_h5ad(p)
    sel = load_counts(counts=p, dataset="a,c")  # several datasets together (an integration's batches)
    assert sel.n_obs == int((two.obs["dataset"] != "b").sum()) and set(sel.obs["dataset"]) == {"a", "c"}
    with pytest.raises(EpiflowError, match="no cell of dataset 'd'"):
        load_counts(counts=p, dataset="a,d")


def test_runner_reports_user_errors(adata, tmp_path, capsys):
    from epiflow.baselines.runner import main

    inp, _ = canonical_input(adata, "feature_extraction")
    inp.obs = inp.obs.drop(columns=["batch"])
    inp.write_h5ad(tmp_path / "i.h5ad")
    (tmp_path / "p.json").write_text("{}")
    rc = main(["--tool", "pca_svm", "--task", "annotation", "--input", str(tmp_path / "i.h5ad"), "--params",
               str(tmp_path / "p.json"), "--output", str(tmp_path / "o.npz")])
    assert rc == 2 and "EPIFLOW-ERROR" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_load_counts_reads_several_corpus_folders_of_one_vocabulary(toy_corpus, tmp_path):
    """The integration baseline of a reference spanning the corpus and a downstream folder."""
    import shutil

    from epiflow.cli import build_parser
    from epiflow.corpus.shard import Shard, write_shard

    c = toy_corpus(n_cells=40, n_ccres=90, n_types=2, seed=3, shard_size=25)
    one = load_counts(corpus=c)
    both = load_counts(corpus=[c, c])
    assert both.n_obs == 2 * one.n_obs and both.n_vars == one.n_vars
    assert (both.X[: one.n_obs] != one.X).nnz == 0
    other = tmp_path / "other"
    shutil.copytree(c, other)
    for f in sorted((other / "shards").glob("*.h5")):
        sh = Shard.from_any(f)
        sh.vocab_id = "another-vocabulary"
        write_shard(f, sh)
    (other / "corpus.json").write_text((other / "corpus.json").read_text().replace(
        Shard.from_any(sorted((c / "shards").glob("*.h5"))[0]).vocab_id, "another-vocabulary"))
    with pytest.raises(InputFormatError, match="different vocabularies"):
        load_counts(corpus=[c, other])
    a = build_parser().parse_args(["run-baseline", "--tool", "lsi", "--task", "integration", "--corpus", "x", "y",
                                   "--out-dir", "o"])
    assert a.corpus == ["x", "y"]


# ----------------------------------------------------------------------------- stimulation, leave-one-type-out
def shift_adapter(adata, task, params):
    """A test adapter (in-process): the held-out type's control cells plus the mean perturbed-minus-control
    change of the other types, clipped to [0, 1] (one predicted cell per control cell, in their order)."""
    x = sp.csr_matrix(adata.X, dtype=np.float32, copy=True)
    x.data[:] = 1.0
    x = x.toarray()
    lab, cond = adata.obs["label"].to_numpy(), adata.obs["condition"].to_numpy()
    t = str(adata.uns["holdout"])
    others = [o for o in np.unique(lab) if o != t]
    shift = np.mean([x[(lab == o) & (cond == "perturbed")].mean(0) - x[(lab == o) & (cond == "control")].mean(0)
                     for o in others], axis=0)
    pred = np.clip(x[(lab == t) & (cond == "control")] + shift, 0, 1)
    return base.BaselineOutput(predicted=pred.astype(np.float32), features=np.arange(adata.n_vars),
                               info={"holdout": t})


@pytest.fixture
def shift_tool(monkeypatch):
    spec = base.AdapterSpec("shift", "Shift", ("perturbation",), "test_baselines:shift_adapter", "inprocess")
    monkeypatch.setitem(base.REGISTRY, "shift", spec)
    return spec


def stimulated(adata):
    """The synthetic cells, half of each type stimulated: the stimulation opens features 0-19 in every type."""
    a = adata.copy()
    a.obs["condition"] = np.where(np.arange(a.n_obs) % 2 == 0, "control", "stim")
    x = a.X.toarray()
    x[a.obs["condition"].to_numpy() == "stim", :20] = 1.0
    a.X = sp.csr_matrix(x)
    return a


def test_stimulation_types_follow_epiagent(adata):
    from epiflow.baselines.run import stimulation_types

    a = stimulated(adata)
    assert stimulation_types(a) == ["T0", "T1", "T2"]
    a.obs.loc[a.obs_names[(a.obs["cell_type"] == "T2").to_numpy() & (a.obs["condition"] == "stim").to_numpy()][2:],
              "condition"] = np.nan  # T2 keeps 2 stimulated cells (< min_cells 3); unset conditions are left out
    assert stimulation_types(a) == ["T0", "T1"]
    assert stimulation_types(a, min_cells=2) == ["T0", "T1", "T2"]
    assert stimulation_types(a, holdout=["T1"]) == ["T1"]
    with pytest.raises(EpiflowError, match="lack >= 3"):
        stimulation_types(a, holdout=["T2"])
    with pytest.raises(EpiflowError, match="control"):
        stimulation_types(a, control="resting")


def test_leave_one_type_out_rows_and_means(adata, shift_tool):
    from epiflow.baselines.run import leave_one_type_out
    from epiflow.tasks.perturbation import STIM_CELLS_COLUMNS

    a = stimulated(adata)
    rows, out, cells = leave_one_type_out("shift", a, holdouts=["T0", "T1", "T2"], method="Shift", dataset="syn",
                                          run={"env": "inprocess"}, canonical={"top_n": 200}, ks=[5, 10],
                                          n_top=50, umap_groups=["T1"], max_umap_cells=20)
    m = pd.DataFrame(rows)
    assert set(m["task"]) == {"stimulated_perturbation"} and set(m["method"]) == {"Shift"}
    v = m.set_index("metric")["value"]
    for t in ("T0", "T1", "T2"):  # one row per held-out type, as predict-stimulation writes them
        for k in ("R2_all", "R2_top50", "dir_acc@5", "dir_acc@10", "wasserstein_top50", "n_cells_control"):
            assert f"{k}[{t}]" in v.index
        assert v[f"n_cells_control[{t}]"] == 15 and v[f"n_cells_perturbed[{t}]"] == 15
        assert v[f"dir_acc_up@10[{t}]"] > 0.9  # the shared opening is recovered from the other types
    for k in ("R2_all", "R2_top50", "dir_acc@10", "wasserstein_top50"):  # the means carry no suffix
        assert v[k] == pytest.approx(np.mean([v[f"{k}[{t}]"] for t in ("T0", "T1", "T2")]))
    assert v["n_heldout_types"] == 3 and v["n_features"] == 200 and v["runtime_total_s"] > 0
    # output.npz: every held-out type's predicted cells, named by group
    assert out.predicted.shape == (45, 200) and list(np.unique(out.groups)) == ["T0", "T1", "T2"]
    assert out.info["holdouts"] == ["T0", "T1", "T2"]
    # Fig. 3g: the UMAPs of the asked type only, EpiAgent's columns, the tool's display name as method
    assert list(cells.columns) == STIM_CELLS_COLUMNS
    assert set(cells["group"]) == {"T1"} and set(cells["method"]) == {"Shift"}
    assert cells["kind"].value_counts().to_dict() == {"unperturbed": 15, "perturbed": 15, "predicted": 15}


def test_evaluate_perturbation_matches_epiagent_metric_code(adata, shift_tool):
    """One held-out type through evaluate(): the same values as evaluate_group on the 0/1 cells."""
    from epiflow.tasks.perturbation import STIM_TASK, evaluate_group

    inp, ctx = canonical_input(stimulated(adata), "perturbation", holdout="T2", top_n=200)
    out = run_baseline("shift", inp, "perturbation", {}, env="inprocess")
    v = {r["metric"]: r["value"] for r in evaluate(out, inp, ctx, dataset="syn", method="Shift", n_top=50)}
    xc, xp = ctx["real_ctrl"].copy(), ctx["real_pert"].copy()
    xc.data[:] = 1.0
    xp.data[:] = 1.0
    # in float64, as evaluate() (a float32 mean leaves other cCREs with a change of exactly 0, which
    # direction accuracy counts as 1/2)
    m = np.asarray(out.predicted, np.float64).mean(0)
    change = m - np.asarray(xc.mean(0), np.float64).ravel()
    ref, _, _ = evaluate_group(X_ctrl=xc, X_pert=xp, predicted={"x": {"mean": m, "change": change}},
                               task=STIM_TASK, n_top=50)
    assert v["R2_all[T2]"] == pytest.approx(ref["x"]["R2_all"]) and v["R2_all"] == v["R2_all[T2]"]
    assert v["dir_acc@100[T2]"] == pytest.approx(ref["x"]["dir_acc@100"])
    assert v["n_heldout_types"] == 1


def test_cli_run_baseline_perturbation_writes_cells(adata, shift_tool, tmp_path):
    from epiflow.cli import main

    a = stimulated(adata)
    a.obs["condition"] = a.obs["condition"].replace({"control": "resting"})
    p = tmp_path / "stim.h5ad"
    a.write_h5ad(p)
    od = tmp_path / "out"
    rc = main(["run-baseline", "--tool", "shift", "--task", "perturbation", "--counts", str(p), "--control",
               "resting", "--holdout", "T0,T2", "--k", "5,10", "--n-top", "50", "--umap-group", "T2",
               "--out-dir", str(od)])
    assert rc == 0
    m = pd.read_csv(od / "metrics.tsv", sep="\t").set_index("metric")["value"]
    assert {"R2_all", "R2_all[T0]", "R2_all[T2]", "dir_acc@10[T2]"} <= set(m.index)
    assert "R2_all[T1]" not in m.index and m["n_heldout_types"] == 2
    cells = pd.read_csv(od / "cells.tsv", sep="\t")
    assert list(cells.columns) == ["group", "method", "kind", "cell", "umap1", "umap2"]
    assert set(cells["group"]) == {"T2"} and set(cells["method"]) == {"Shift"}
    assert set(cells["cell"]) <= set(a.obs_names)  # source cells of the predictions, real cells' names
    saved = base.load_output(od / "output.npz")
    assert sorted(set(saved.groups)) == ["T0", "T2"] and saved.predicted.shape[0] == 30
    # --no-umap (tasks.stimulation.umap false): the same scores, no UMAP made, and no stale cells.tsv left
    rc = main(["run-baseline", "--tool", "shift", "--task", "perturbation", "--counts", str(p), "--control",
               "resting", "--holdout", "T0,T2", "--k", "5,10", "--n-top", "50", "--umap-group", "T2",
               "--no-umap", "--out-dir", str(od)])
    assert rc == 0 and not (od / "cells.tsv").exists()
    pd.testing.assert_series_equal(pd.read_csv(od / "metrics.tsv", sep="\t").set_index("metric")["value"]
                                   .drop(m.index[m.index.str.startswith("runtime")], errors="ignore"),
                                   m.drop(m.index[m.index.str.startswith("runtime")], errors="ignore"))
    # without --holdout: every usable type in turn
    rc = main(["run-baseline", "--tool", "shift", "--task", "perturbation", "--counts", str(p), "--control",
               "resting", "--k", "5", "--n-top", "50", "--out-dir", str(tmp_path / "all")])
    m = pd.read_csv(tmp_path / "all" / "metrics.tsv", sep="\t").set_index("metric")["value"]
    assert rc == 0 and m["n_heldout_types"] == 3
    assert set(pd.read_csv(tmp_path / "all" / "cells.tsv", sep="\t")["group"]) == {"T0", "T1", "T2"}
    # the scoring flags are the EpiAgent tasks' settings: their types and bounds, clear errors (exit 2)
    base_argv = ["run-baseline", "--tool", "shift", "--task", "perturbation", "--counts", str(p), "--control",
                 "resting", "--out-dir", str(tmp_path / "bad")]
    with pytest.raises(SystemExit) as stop:   # argparse: "argument --k: --k: 'abc' is not an integer"
        main(base_argv + ["--k", "abc"])
    assert stop.value.code == 2
    for bad in (["--k", "5,0"], ["--n-top", "0"], ["--min-cells", "0"]):   # the settings' bounds
        assert main(base_argv + bad) == 2, bad
    assert not (tmp_path / "bad" / "metrics.tsv").exists()
