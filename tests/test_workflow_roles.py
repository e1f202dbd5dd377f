"""Corpus vs downstream in the workflow (issue 15), by dry runs: downstream cells are in no pretraining
input, each downstream dataset is tokenized onto the corpus vocabulary and evaluated from its own
folder, a config with only downstream datasets and a checkpoint plans no pretraining, and the real-data
transfer benchmark (config/transfer.yaml) plans its stages. No data file is read (dry runs)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import yaml

from test_workflow import snakemake

ROOT = Path(__file__).resolve().parents[1]


def _jobs_by_rule(out: str) -> dict[str, list[str]]:
    """rule -> shell commands of its planned jobs (`snakemake -n -p` output)."""
    jobs: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line)
        if m:
            current = m.group(1)
            jobs.setdefault(current, [])
        elif current and line.startswith("Shell command: "):
            jobs[current].append(line[len("Shell command: "):])
    return jobs


def _manifest(tmp_path: Path, rows: list[tuple[str, str]]) -> Path:
    m = tmp_path / "manifest.tsv"
    m.write_text("name\tformat\tpath\tgenome\tcell_type_key\trole\n"
                 + "".join(f"{n}\th5ad\t{n}.h5ad\thg38\tcell_type\t{r}\n" for n, r in rows))
    return m


def _dry(tmp_path: Path, cfg: dict) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake("all", "-n", "-p", "--cores", "2", "--configfile", str(path))
    return proc.returncode, proc.stdout + proc.stderr


TASKS_OFF = {t: {"enabled": False} for t in ("imputation", "stimulation", "genetic", "integration",
                                               "knockout", "zeroshot_annotation")}


def test_downstream_cells_are_in_no_pretraining_input(tmp_path):
    res = tmp_path / "res"
    man = _manifest(tmp_path, [("ref_a", "corpus"), ("ref_b", ""), ("newstudy", "downstream")])
    rc, out = _dry(tmp_path, {
        "results_dir": str(res), "datasets": {"manifest": str(man)},
        "tasks": {"feature_extraction": {"datasets": ["ref_a", "newstudy"]},
                  "annotation": {"datasets": ["newstudy"]}, **TASKS_OFF},
        "baselines": {"datasets": ["newstudy"]}})
    assert rc == 0, out
    jobs = _jobs_by_rule(out)
    # all three are mapped; the corpus (vocabulary, df, pretraining cells) gets the corpus two only
    mapped = " ".join(jobs["map_dataset"])
    for name in ("ref_a", "ref_b", "newstudy"):
        assert f"--dataset {name} " in mapped
    (build,) = jobs["build_corpus"]
    assert f"{res}/mapped/ref_a.h5ad" in build and f"{res}/mapped/ref_b.h5ad" in build
    assert "newstudy" not in build
    (pretrain,) = jobs["pretrain"]
    assert f"--corpus {res}/corpus " in pretrain and "newstudy" not in pretrain
    assert f"{res}/downstream" not in pretrain
    # the downstream dataset: tokenized onto the corpus vocabulary + df, embedded and evaluated from its folder
    (tok,) = jobs["downstream_corpus"]
    assert f"--mapped {res}/mapped/newstudy.h5ad" in tok and f"--corpus {res}/corpus " in tok
    assert f"--out {res}/downstream/newstudy" in tok
    (emb,) = jobs["embed_downstream"]
    assert f"--corpus {res}/downstream/newstudy " in emb
    fe = {re.search(r"--dataset (\S+)", c).group(1): c for c in jobs["evaluate_features"]}
    assert f"--corpus {res}/downstream/newstudy " in fe["newstudy"]
    assert f"EpiAgent={res}/embed/downstream/newstudy.h5ad" in fe["newstudy"]
    assert f"--corpus {res}/corpus " in fe["ref_a"] and f"EpiAgent={res}/embed/embeddings.h5ad" in fe["ref_a"]
    (ann,) = jobs["annotate"]
    assert f"--corpus {res}/downstream/newstudy " in ann
    # every baseline job on baselines.datasets (the demo's SnapATAC2 tools; LSI is the feature_extraction
    # task's own on its datasets) reads the downstream folder
    bl = [c for c in jobs["run_baseline"] if "--task integration" not in c]
    assert len(bl) >= 1 and any("--tool snapatac2 " in c for c in bl) and not any("--tool lsi " in c for c in bl)
    assert all(f"--corpus {res}/downstream/newstudy " in c and "--dataset newstudy " in c for c in bl), bl
    (summ,) = jobs["summarize"]
    assert f"--corpus {res}/corpus" in summ and f"--downstream {res}/downstream/newstudy" in summ
    assert "--external-checkpoint" not in summ


def test_downstream_only_config_with_a_checkpoint_plans_no_pretraining(tmp_path):
    res = tmp_path / "res"
    man = _manifest(tmp_path, [("study_a", "downstream"), ("study_b", "downstream")])
    (tmp_path / "weights.pth").write_bytes(b"x")
    (tmp_path / "vocab.bed").write_text("chr1\t0\t100\n")
    np.save(tmp_path / "df.npy", np.array([0.5]))
    cfg = {"results_dir": str(res), "datasets": {"manifest": str(man)},
           "model": {"checkpoint": str(tmp_path / "weights.pth")},
           "vocabulary": {"mode": "external", "external_bed": str(tmp_path / "vocab.bed"),
                          "external_df": str(tmp_path / "df.npy")},
           "tasks": {"feature_extraction": {"datasets": ["study_a", "study_b"]},
                     "annotation": {"datasets": ["study_a"]}, **TASKS_OFF},
           "baselines": {"enabled": False}}
    rc, out = _dry(tmp_path, cfg)
    assert rc == 0, out
    jobs = _jobs_by_rule(out)
    for rule in ("pretrain", "build_corpus", "embed"):
        assert rule not in jobs, (rule, sorted(jobs))
    assert f"{res}/corpus" not in out and f"{res}/pretrain" not in out
    toks = jobs["downstream_corpus"]
    assert len(toks) == 2
    for cmd in toks:  # the checkpoint's own vocabulary (= the external candidates) and its df
        assert f"--vocab {res}/candidates/candidates.bed --df {tmp_path / 'df.npy'}" in cmd and "--corpus" not in cmd
    for cmd in jobs["evaluate_features"] + jobs["annotate"]:
        assert str(tmp_path / "weights.pth") in cmd and f"{res}/downstream/" in cmd
    (summ,) = jobs["summarize"]
    assert "--external-checkpoint" in summ and "--corpus" not in summ

    # without a checkpoint there is nothing to pretrain on: a clear error before any job
    cfg["model"] = {"checkpoint": None}
    rc, out = _dry(tmp_path, cfg)
    assert rc != 0 and "model.checkpoint" in out and "role 'corpus'" in out and "Traceback" not in out
    # 'all' means every corpus cell: there is none
    cfg["model"] = {"checkpoint": str(tmp_path / "weights.pth")}
    cfg["tasks"]["annotation"] = {"datasets": ["all"]}
    rc, out = _dry(tmp_path, cfg)
    assert rc != 0 and "'all' needs the corpus" in out and "has no dataset of role 'corpus'" in out, out


def test_integration_reads_corpus_and_downstream_folders_together_other_units_do_not(tmp_path):
    """The paper's integration reference mixes corpus datasets (Li2023a, Lee2023) and a downstream one
    (Li2023b): `integrate` gets both folders. A zero-shot annotator's reference is read from one folder,
    so a mix there stops the run naming its key."""
    man = _manifest(tmp_path, [("ref_a", "corpus"), ("ref_b", "corpus"), ("newstudy", "downstream"),
                               ("query_x", "downstream")])
    base = {"results_dir": str(tmp_path / "res"), "datasets": {"manifest": str(man)},
            "baselines": {"enabled": False}}
    fa = {"feature_extraction": {"datasets": ["ref_a"]}, "annotation": {"datasets": ["ref_a"]}}
    rc, out = _dry(tmp_path, {**base, "tasks": {**fa, **{
        **TASKS_OFF, "integration": {"enabled": True, "datasets": ["ref_a", "ref_b", "newstudy"],
                                     "batch_key": "dataset", "query": ["query_x"]}}}})
    assert rc == 0, out
    (integ,) = _jobs_by_rule(out)["integrate"]
    res = tmp_path / "res"
    assert f"--corpus {res}/corpus {res}/downstream/newstudy " in integ
    assert f"--query {res}/downstream/query_x" in integ
    assert "--dataset ref_a,ref_b,newstudy" in integ and "--batch-key dataset" in integ
    # the downstream datasets are still tokenized apart from the corpus and never pretrained on
    assert {"downstream_corpus", "integrate"} <= set(_jobs_by_rule(out))
    rc, out = _dry(tmp_path, {**base, "tasks": {**fa, **{
        **TASKS_OFF, "zeroshot_annotation": {"enabled": True, "datasets": ["newstudy"], "label_key": "cell_type",
                                             "reference": ["ref_a"],
                                             "annotators": [{"name": "mixed", "reference": ["ref_a", "query_x"],
                                                             "datasets": ["newstudy"]}]}}}})
    assert rc != 0
    assert "reference of" in out and "different folders" in out and "Traceback" not in out, out


def test_transfer_config_dry_runs(tmp_path):
    res = tmp_path / "res"
    proc = snakemake("all", "-n", "-p", "--cores", "2", "--configfile", "config/transfer.yaml",
                     "--config", f"results_dir={res}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    jobs = _jobs_by_rule(out)
    (build,) = jobs["build_corpus"]
    assert "granja2019_d6t1_pretrain.h5ad" in build and "heldout" not in build and "buenrostro" not in build
    assert sorted(re.search(r"--out \S+/downstream/(\S+)", c).group(1) for c in jobs["downstream_corpus"]) \
        == ["buenrostro2018_bm0828", "granja2019_d6t1_heldout"]
    fe = jobs["evaluate_features"] + jobs["evaluate_features_trajectory"]
    assert len(fe) == 2 and all("/downstream/" in c and "--epochs 2" in c for c in fe)
    # LSI on each dataset's own peaks beside LSI on the corpus vocabulary (when the h5ad is here)
    for c in fe:
        src = {"granja2019_d6t1_heldout": "granja2019_bmmc_d6t1.h5ad",
               "buenrostro2018_bm0828": "buenrostro2018_bm0828.h5ad"}[re.search(r"--dataset (\S+)", c).group(1)]
        local = (ROOT / "config" / "manifests" / "../../../shared/data" / src).exists()
        assert (re.search(rf"--own-features \S+/{src}", c) is not None) == local, c
    assert len(jobs["annotate"]) == 2
    tools = {re.search(r"--tool (\S+)", c).group(1) for c in jobs["run_baseline"]}
    assert {"pca", "snapatac2"} <= tools and "lsi" not in tools  # LSI: the feature_extraction task's own
    assert "pretrain" in jobs
    # imputation (Fig. 2j-m) on the unseen cells: EpiAgent and scOpen / scCASE on the same downstream folders,
    # the baselines scored with the task's filter and label column
    assert sorted(re.search(r"--dataset (\S+)", c).group(1) for c in jobs["impute"]) \
        == ["buenrostro2018_bm0828", "granja2019_d6t1_heldout"]
    imp = [c for c in jobs["run_baseline"] if "--task imputation" in c]
    assert sorted(re.search(r"--tool (\S+)", c).group(1) for c in imp) == ["sccase", "sccase", "scopen", "scopen"]
    assert all("/downstream/" in c and "--min-cell-fraction 0.03" in c and "--label-key cell_type" in c for c in imp)



def test_transfer_learn_config_layers_the_learning_options(tmp_path):
    """config/transfer_learn.yaml on top of config/transfer.yaml: the pretraining and the
    feature-extraction fine-tuning take the #15 options; the paper's defaults stay in config.yaml."""
    res = tmp_path / "res"
    proc = snakemake("all", "-n", "-p", "--cores", "2", "--configfile", "config/transfer.yaml",
                     "config/transfer_learn.yaml", "--config", f"results_dir={res}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    jobs = _jobs_by_rule(out)
    (pre,) = jobs["pretrain"]
    for flag in ("--init bert", "--cca-negatives df", "--sr-objective multinomial", "--lr 0.005", "--epochs 12"):
        assert flag in pre, (flag, pre)
    assert all("--sr-objective multinomial" in c for c in jobs["evaluate_features"])
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert base["pretrain"]["sr_objective"] == "bce" and base["pretrain"]["cca_negatives"] == "uniform"
    assert base["model"]["init"] is None


def test_realdata_config_runs_the_semisynthetic_perturbation_benchmarks_and_every_panel():
    """config/realdata.yaml: the semi-synthetic benchmarks (rule perturbation_benchmark) are built from the
    Buenrostro cells before the mapping jobs, tokenized as downstream datasets, and read by the two
    perturbation verbs; every figure panel of the registry is planned."""
    from epiflow.plots.figures import PANELS

    if not (ROOT.parent / "shared" / "data" / "buenrostro2018_bm0828.h5ad").exists():
        import pytest

        pytest.skip("config/realdata.yaml reads ../shared/data, which is absent")
    proc = snakemake("all", "-n", "-p", "--cores", "2", "--configfile", "config/realdata.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    jobs = _jobs_by_rule(out)
    (bench,) = jobs["perturbation_benchmark"]
    assert "make-perturbation-benchmark --corpus ../shared/data/buenrostro2018_bm0828.h5ad" in bench
    assert "--no-corpus --out results/realdata/perturbation_benchmark" in bench
    downstream = " ".join(jobs["downstream_corpus"])
    assert "semisynthetic_stimulation" in downstream and "semisynthetic_genetic" in downstream
    (stim,) = jobs["predict_stimulation"]
    (gen,) = jobs["predict_genetic"]
    assert "--corpus results/realdata/downstream/semisynthetic_stimulation" in stim
    assert "--corpus results/realdata/downstream/semisynthetic_genetic" in gen
    # the benchmark's files are inputs of the mapping, so they exist before any dataset is read
    assert "results/realdata/perturbation_benchmark/stimulation.h5ad" in out[out.index("rule candidate_ccres:"):]
    planned = set(re.findall(r"figures/(fig\w+)\.png", out))
    assert set(PANELS) <= planned, sorted(set(PANELS) - planned)
