"""The whole workflow end to end on the reduced configuration (config/test.yaml), then the report.

Runs in a temporary working directory (its own .snakemake metadata), checks that every output the
DAG declares exists and is non-empty, that the summary gathers the task metrics, and that
`snakemake --report` writes the HTML report. A missing `epiflow` verb makes the run fail here.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake")] if (BIN / "snakemake").exists() else [sys.executable, "-m", "snakemake"]


def _run(args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _common(workdir: Path) -> list[str]:
    return ["-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(workdir),
            "--profile", str(ROOT / "profiles" / "local"), "--cores", "2",
            "--configfile", str(ROOT / "config" / "test.yaml")]


def _tail(proc: subprocess.CompletedProcess, n: int = 6000) -> str:
    return (proc.stdout + proc.stderr)[-n:]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    proc = _run(["all", *_common(workdir)], ROOT, timeout=900)
    if proc.returncode != 0:
        logs = sorted((workdir / "results" / "test" / "logs").rglob("*.log"))
        detail = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.stat().st_size)
        pytest.fail(f"workflow failed (rc {proc.returncode}):\n{_tail(proc)}\n{detail}")
    return workdir


def _declared_outputs(workdir: Path) -> list[Path]:
    """Every output file of the workflow's DAG, from `snakemake --summary`."""
    proc = _run(["all", *_common(workdir), "--summary"], ROOT, timeout=300)
    assert proc.returncode == 0, _tail(proc)
    rows = [line.split("\t") for line in proc.stdout.splitlines() if "\t" in line]
    assert rows and rows[0][0] == "output_file", proc.stdout[:2000]
    header = rows[0]
    status = header.index("status")
    outs = []
    for row in rows[1:]:
        assert row[status] != "missing", row
        outs.append(workdir / row[0] if not os.path.isabs(row[0]) else Path(row[0]))
    return outs


@pytest.mark.slow
def test_demo_workflow_produces_every_declared_output(demo_run):
    outs = _declared_outputs(demo_run)
    res = demo_run / "results" / "test"
    rules_seen = {p.relative_to(res).parts[0] for p in outs}
    for stage in ("simulate", "candidates", "mapped", "corpus", "downstream", "pretrain", "embed", "tasks",
                  "baselines"):
        assert stage in rules_seen, sorted(rules_seen)
    tasks_seen = {p.relative_to(res / "tasks").parts[0] for p in outs if p.is_relative_to(res / "tasks")}
    assert tasks_seen == {"feature_extraction", "annotation", "imputation", "stimulation", "genetic",
                          "integration", "knockout", "zeroshot_annotation"}, tasks_seen
    for path in outs:
        assert path.exists(), path
        if path.is_dir():
            assert any(path.iterdir()), f"empty output folder {path}"
        else:
            assert path.stat().st_size > 0, f"empty output {path}"
    # every rule left a log and a benchmark
    for sub in ("logs", "benchmarks"):
        names = {p.stem for p in (res / sub).rglob("*.*")}
        for rule in ("simulate", "candidate_ccres", "build_corpus", "pretrain", "embed", "summarize",
                     "atlas_b1", "knockout_screen", "tumor_pair", "atlas", "annotator-EpiAgent-B",
                     "annotator-EpiAgent-NT", "EpiAgent-B.pbmc_fragments", "pbmc_fragments"):
            assert rule in names, (sub, rule, sorted(names))


@pytest.mark.slow
def test_summary_gathers_the_metrics(demo_run):
    res = demo_run / "results" / "test"
    with open(res / "summary.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    tasks = {r["task"] for r in rows}
    assert {"corpus", "pretrain", "feature_extraction", "annotation", "imputation",
            "stimulated_perturbation", "genetic_perturbation", "integration", "query_mapping", "knockout",
            "zeroshot_annotation"} <= tasks, tasks
    nmi = [r for r in rows if r["task"] == "feature_extraction" and r["metric"] == "NMI"]
    assert {r["method"] for r in nmi} >= {"EpiAgent", "LSI"}
    for r in nmi:
        assert 0.0 <= float(r["value"]) <= 1.0
    # the integration of the atlas batches and the zero-shot annotation of an unseen dataset
    integ = {(r["method"], r["metric"]) for r in rows if r["task"] == "integration"}
    assert {("EpiAgent-BC", "iLISI"), ("LSI", "NMI")} <= integ, sorted(integ)
    zs = [r for r in rows if r["task"] == "zeroshot_annotation" and r["metric"] == "accuracy"
          and r["dataset"] == "pbmc_fragments"]
    assert zs and all(0.0 <= float(r["value"]) <= 1.0 for r in zs), zs
    # config/test.yaml trains two annotators (EpiAgent-B and -NT analogues) and scores both
    assert {"EpiAgent-B", "EpiAgent-NT"} <= {r["method"] for r in zs}, zs
    n_cells = [float(r["value"]) for r in rows if r["task"] == "corpus" and r["metric"] == "n_cells"]
    assert n_cells and n_cells[0] > 0


@pytest.mark.slow
def test_html_report(demo_run):
    report = demo_run / "report.html"
    proc = _run(["all", *_common(demo_run), "--report", str(report)], ROOT, timeout=300)
    assert proc.returncode == 0, _tail(proc)
    text = report.read_text(errors="replace")
    assert len(text) > 10_000
    for caption_word in ("Feature extraction", "Annotation", "Imputation", "Stimulated perturbation",
                         "Genetic perturbation", "Integration", "Knockout", "Zero-shot annotation",
                         "Pretraining", "summary.tsv"):
        assert caption_word in text, caption_word


@pytest.mark.slow
def test_downstream_dataset_never_enters_pretraining(demo_run):
    """The demo declares pbmc_fragments downstream (config datasets.simulate.downstream): none of its
    cells is in the corpus the model was pretrained on; it is tokenized onto the corpus vocabulary with
    the corpus df, evaluated from its own folder, and the summary says the model never saw it."""
    import numpy as np

    from epiflow.corpus.shard import open_corpus

    res = demo_run / "results" / "test"
    corpus = open_corpus(res / "corpus")
    ds = open_corpus(res / "downstream" / "pbmc_fragments")
    assert "pbmc_fragments" not in corpus.meta["datasets"] and ds.meta["datasets"] == ["pbmc_fragments"]
    assert ds.meta["role"] == "downstream" and ds.vocab_id == corpus.vocab_id
    assert np.array_equal(np.load(res / "corpus" / "df.npy"), np.load(res / "downstream" / "pbmc_fragments" / "df.npy"))
    corpus_obs = [s.obs for s in corpus.iter_shards()]
    corpus_ids = set(np.concatenate([o["cell_id"].astype(str) for o in corpus_obs]))
    ds_ids = set(np.concatenate([s.obs["cell_id"].astype(str) for s in ds.iter_shards()]))
    assert ds_ids and not corpus_ids & ds_ids
    assert not any((o["dataset"].astype(str) == "pbmc_fragments").any() for o in corpus_obs)
    # the downstream peaks were no candidate cCREs
    import json

    cand = json.loads((res / "candidates" / "candidates.bed.json").read_text())
    assert cand["downstream_not_used"] == ["pbmc_fragments"]
    with open(res / "summary.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    seen = {(r["task"], r["dataset"]): r["seen_in_pretraining"] for r in rows}
    assert seen[("zeroshot_annotation", "pbmc_fragments")] == "false"
    assert seen[("query_mapping", "pbmc_fragments")] == "false"
    assert seen[("feature_extraction", "atlas_b1")] == "true"
    # config/test.yaml evaluates it with the zero-shot embeddings of rule embed_downstream
    assert seen[("feature_extraction", "pbmc_fragments")] == "false"
    import anndata as ad

    emb = ad.read_h5ad(res / "embed" / "downstream" / "pbmc_fragments.h5ad")
    assert set(emb.obs["cell_id"].astype(str)) == ds_ids and "X_epiagent" in emb.obsm
    assert seen[("corpus", "pbmc_fragments")] == "false"
