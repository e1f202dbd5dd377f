"""The workflow spine: lint, formatting, config validation, dry runs, SLURM submission arguments.

Every test runs Snakemake (or snakefmt) as a subprocess from the repository root; none needs a
cluster or data beyond the repository (the real-data dry run skips without ../shared/data).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake")] if (BIN / "snakemake").exists() else [sys.executable, "-m", "snakemake"]


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def snakemake(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------ lint / format
def test_snakemake_lint_is_clean():
    proc = snakemake("--lint")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Lints for" not in out, out
    assert "Congratulations" in out


def test_snakefmt_check_is_clean():
    snakefmt = BIN / "snakefmt"
    cmd = [str(snakefmt)] if snakefmt.exists() else [sys.executable, "-m", "snakefmt"]
    proc = subprocess.run([*cmd, "--check", "workflow/"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ configuration
# the task rules that the demo and test configurations run beside the original four
NEW_TASK_RULES = ("predict_genetic", "integrate", "knockout", "train_annotator", "annotate_zeroshot")
GPU_TASK_RULES = ("evaluate_features", "annotate", "impute", "predict_stimulation", *NEW_TASK_RULES)


@pytest.mark.parametrize("configfile", [None, "config/test.yaml", "config/realdata.yaml"])
def test_shipped_configs_validate_and_dry_run(configfile, tmp_path):
    args = ["-n", "--cores", "2", "--config", f"results_dir={tmp_path / 'res'}"]
    if configfile:
        if configfile == "config/realdata.yaml" and not (ROOT.parent / "shared" / "data").exists():
            pytest.skip("config/realdata.yaml reads ../shared/data, which is absent")
        args = ["--configfile", configfile, *args]
    proc = snakemake("all", *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for rule in ("candidate_ccres", "build_corpus", "pretrain", "embed", "evaluate_features", "annotate",
                 "impute", "summarize", *(NEW_TASK_RULES if configfile != "config/realdata.yaml" else ())):
        assert re.search(rf"^rule {rule}:|^localrule {rule}:", out, re.M) or f" {rule} " in out, (rule, out)


BAD_CONFIGS = {
    # misspelt keys at three levels, a wrong type, a value outside its enum, a wrong nested type
    "unknown_keys": ({"resultsdir": "x", "model": {"num_head": 4}, "pretrain": {"lr_max": 0.1}},
                     ["resultsdir", "model.num_head", "pretrain.lr_max"]),
    "wrong_types": ({"pretrain": {"epochs": "three", "k_schedule": [1, "two"]}, "genome": "hg37",
                     "tasks": {"feature_extraction": {"enabled": "yes"}}},
                    ["pretrain.epochs", "pretrain.k_schedule.1", "genome",
                     "tasks.feature_extraction.enabled"]),
    "resources": ({"resources": {"pretrain": {"gpus": 2}, "embed": {"mem_mb": -1}}},
                  ["resources.pretrain.gpus", "resources.embed.mem_mb"]),
    "external_vocab_without_bed": ({"vocabulary": {"mode": "external"}}, ["vocabulary.external_bed"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_rejected_naming_the_key(case, tmp_path):
    data, keys = BAD_CONFIGS[case]
    proc = snakemake("all", "-n", "--cores", "1", "--configfile", str(_write_config(tmp_path, data)))
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0, err
    assert "invalid configuration" in err, err
    for key in keys:
        assert f"'{key}'" in err, (key, err)
    assert "Traceback" not in err


# ------------------------------------------------------------------ the jobs' interpreter
def test_every_job_runs_epiflow_with_the_snakemake_interpreter(tmp_path):
    """Rules call `"$EPIFLOW_PYTHON" -m epiflow`, never `python` from PATH; the shell prefix sets it to
    config `python`, else the interpreter running Snakemake, so `.venv/bin/snakemake all` works
    without activating .venv (issue 16)."""
    proc = snakemake("all", "-n", "-p", "--cores", "1", "--config", f"results_dir={tmp_path / 'res'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shells = re.findall(r"^Shell command: (.*)$", proc.stdout + proc.stderr, flags=re.M)
    calls = [s for s in shells if "-m epiflow" in s]
    assert len(calls) >= 15, shells
    # (after environment assignments: the baseline jobs pin PYTHONHASHSEED, a tool's result must not
    # follow the process's hash seed)
    assert all(re.sub(r"^(\w+=\S*\s+)*", "", s.strip()).startswith('"$EPIFLOW_PYTHON" -m epiflow ')
               for s in calls), calls
    assert all(s.strip().startswith('PYTHONHASHSEED=0 "$EPIFLOW_PYTHON" -m epiflow run-baseline ')
               for s in calls if "run-baseline" in s)
    assert not any(re.search(r"(^|[\s;(])python3? -m epiflow", s) for s in shells)
    assert any("torchrun_launch.sh" in s for s in shells)
    assert "${EPIFLOW_PYTHON:-python}" in (ROOT / "scripts" / "torchrun_launch.sh").read_text()

    # for real, with nothing of the environment on PATH: the first job runs with Snakemake's Python
    env = {"HOME": os.environ.get("HOME", str(tmp_path)), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}

    def simulate(res: Path, *config: str) -> tuple[subprocess.CompletedProcess, str]:
        p = subprocess.run([*SNAKEMAKE, str(res / "simulate" / "manifest.tsv"), "--cores", "1", "--configfile",
                            "config/test.yaml", "--config", f"results_dir={res}", *config], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        log = res / "logs" / "simulate.log"
        return p, log.read_text() if log.exists() else ""

    proc, log = simulate(tmp_path / "real")
    assert proc.returncode == 0, proc.stderr[-3000:] + log[-2000:]
    assert (tmp_path / "real" / "simulate" / "manifest.tsv").stat().st_size > 0
    # config `python` overrides it
    proc, log = simulate(tmp_path / "other", "python=/nonexistent/bin/python3")
    assert proc.returncode != 0 and "/nonexistent/bin/python3" in log + proc.stderr


# ------------------------------------------------------------------ SLURM profile
def _dry_run_jobs(out: str) -> dict[str, dict]:
    """rule name -> {'resources': {...}, 'shell': str} parsed from `snakemake -n -p` output."""
    jobs: dict[str, dict] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line)
        if m:
            current = jobs.setdefault(m.group(1), {"resources": {}, "shell": ""})
            continue
        if current is None:
            continue
        m = re.match(r"^\s+resources: (.*)$", line)
        if m:
            for item in re.split(r", (?=\w+=)", m.group(1)):
                key, _, value = item.partition("=")
                current["resources"][key] = value
        elif line.startswith("Shell command: "):
            current["shell"] = line[len("Shell command: "):]
    return jobs


@pytest.fixture(scope="module")
def slurm_dry_run(tmp_path_factory) -> dict[str, dict]:
    # an empty results folder of its own: an up-to-date results/ in the checkout would plan no jobs
    res = tmp_path_factory.mktemp("slurm") / "res"
    proc = snakemake("all", "--profile", "profiles/slurm", "-n", "--config", f"results_dir={res}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return _dry_run_jobs(out)


def test_slurm_profile_dry_runs_without_slurm(slurm_dry_run):
    for rule in ("simulate", "candidate_ccres", "build_corpus", "pretrain", "embed", "evaluate_features"):
        assert rule in slurm_dry_run, sorted(slurm_dry_run)
    pretrain = slurm_dry_run["pretrain"]
    # MPI mode: the launcher runs once per node under srun, and starts torchrun itself
    assert pretrain["shell"].startswith("srun --ntasks-per-node=1"), pretrain["shell"]
    assert "torchrun_launch.sh --corpus" in pretrain["shell"]


class _Resources(dict):
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _as_value(text: str):
    try:
        return int(text)
    except ValueError:
        return text


def _fake_job(rule: str, dry: dict, threads: int):
    res = _Resources({k: _as_value(v) for k, v in dry[rule]["resources"].items() if v != "<TBD>"})
    return SimpleNamespace(name=rule, threads=threads, resources=res, is_group=lambda: False,
                           wildcards={})


def _sbatch(job) -> list[str]:
    """The sbatch command line the official plugin would submit for `job` (no cluster needed)."""
    from snakemake_executor_plugin_slurm import Executor
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    partition = Executor.get_partition_arg(SimpleNamespace(_partitions=None, _fallback_partition=None), job)
    params = {"run_uuid": "uuid", "slurm_logfile": "/tmp/slurm/%j.log", "comment_str": f"rule_{job.name}",
              "account": "", "partition": partition, "workdir": str(ROOT)}
    call = get_submit_command(job, params) + set_gres_string(job)
    return shlex.split(call)


def test_sbatch_arguments_of_gpu_rules(slurm_dry_run):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())
    # the dry run really applied the profile's resources
    for rule in ("pretrain", "embed", *GPU_TASK_RULES):
        for key, value in profile["set-resources"][rule].items():
            got = slurm_dry_run[rule]["resources"].get(key)
            # (slurm_extra is written quoted in the profile, as the plugin asks; the resource is unquoted)
            assert str(got) == str(value).strip("'"), (rule, key, got, value)

    argv = _sbatch(_fake_job("pretrain", slurm_dry_run, threads=2))
    assert argv[0] == "sbatch"
    for flag in ("-p", "gpu"), ("-t", "2880"), ("--mem", "480000"):
        i = argv.index(flag[0])
        assert argv[i + 1] == flag[1], (flag, argv)
    assert "--nodes=2" in argv and "--ntasks=2" in argv, argv
    assert "--gpus=8" in argv and "--cpus-per-gpu=8" in argv, argv
    # one task per node (torchrun spawns the per-GPU workers), never one task per GPU
    assert not any(a.startswith("--ntasks-per-gpu") for a in argv), argv
    assert not any(a.startswith("--cpus-per-task") for a in argv), argv
    # the time-limit warning that makes pretraining save and resume on the next submission (issue 17)
    assert "--signal=USR1@300" in " ".join(argv), argv

    for rule in ("embed", *GPU_TASK_RULES):
        argv = _sbatch(_fake_job(rule, slurm_dry_run, threads=8))
        assert argv[argv.index("-p") + 1] == "gpu"
        assert "--gpus=1" in argv and "--cpus-per-gpu=8" in argv, argv
        assert "--ntasks=1" not in argv or rule  # GPU jobs: task geometry left to SLURM
        assert not any(a.startswith("--nodes") for a in argv), argv

    argv = _sbatch(_fake_job("build_corpus", slurm_dry_run, threads=8))
    assert argv[argv.index("-p") + 1] == "cpu"
    assert "--cpus-per-task=8" in argv and "--ntasks=1" in argv, argv
    assert not any(a.startswith("--gpus") for a in argv), argv


def test_slurm_profile_threads_match_the_cores_asked_for(slurm_dry_run):
    """Every rule that runs the model on a GPU asks for one (embedding the downstream datasets too),
    and its process uses the cores it asks SLURM for: set-threads = cpus_per_gpu (Snakemake exports
    the threads as OMP_NUM_THREADS). The data rules of paper-size corpora get more than the
    config's default 2 GB / 30 min."""
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())
    res, threads = profile["set-resources"], profile["set-threads"]
    gpu_rules = {r for r, v in res.items() if v.get("gpu")}
    assert {"embed", "embed_downstream", "evaluate_features_trajectory", *GPU_TASK_RULES} <= gpu_rules
    for rule in gpu_rules - {"pretrain"}:
        assert threads.get(rule) == res[rule]["cpus_per_gpu"], rule
    for rule in ("candidate_ccres", "map_dataset", "build_corpus", "downstream_corpus", "run_baseline"):
        assert int(res[rule]["mem_mb"]) >= 16000 and int(res[rule]["runtime"]) >= 120, rule
        if rule in slurm_dry_run:  # (the demo's datasets are planned after its simulate checkpoint)
            assert int(slurm_dry_run[rule]["resources"]["mem_mb"]) == int(res[rule]["mem_mb"]), rule


def test_torchrun_launcher_single_device_runs_in_process(tmp_path):
    """Outside SLURM with one device the launcher just runs `epiflow pretrain` (here: its --help)."""
    env = _env()
    for k in list(env):
        if k.startswith("SLURM_"):
            env.pop(k)
    env["EPIFLOW_GPUS_PER_NODE"] = "1"
    proc = subprocess.run(["bash", "scripts/torchrun_launch.sh", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: epiflow pretrain" in proc.stdout


def test_torchrun_launcher_multi_node_builds_c10d_rendezvous(tmp_path):
    """Two nodes x 4 GPUs: the launcher hands over to torchrun with a c10d rendezvous on port 29500."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "torchrun").write_text("#!/usr/bin/env bash\necho TORCHRUN \"$@\"\n")
    (fake / "scontrol").write_text("#!/usr/bin/env bash\necho node001; echo node002\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = _env()
    env.update(PATH=f"{fake}{os.pathsep}{env['PATH']}", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE="4", SLURM_JOB_NODELIST="node[001-002]", SLURM_JOB_ID="4242")
    env.pop("MASTER_ADDR", None)
    proc = subprocess.run(["bash", "scripts/torchrun_launch.sh", "--corpus", "C", "--out", "O"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("TORCHRUN "), proc.stdout
    argv = line.split()[1:]
    assert "--nnodes=2" in argv and "--nproc_per_node=4" in argv, argv
    assert "--rdzv_backend=c10d" in argv and "--rdzv_endpoint=node001:29500" in argv, argv
    assert "--rdzv_id=4242" in argv
    assert argv[-7:] == ["-m", "epiflow", "pretrain", "--corpus", "C", "--out", "O"], argv


# ------------------------------------------------------------------ README / CI
def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    start = lines.index("```bash")
    assert all(not ln.strip() or ln.startswith("#") for ln in lines[:start]), "README must start with the commands"
    block = lines[start + 1:lines.index("```", start + 1)]
    return [ln.split("#", 1)[0].strip() for ln in block if ln.split("#", 1)[0].strip()]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    demo, tests = _readme_commands()
    for cmd in (demo, tests):
        script = cmd.split()[1]
        assert cmd.split()[0] == "bash" and (ROOT / script).exists(), cmd
        text = (ROOT / script).read_text()
        assert "scripts/setup_env.sh" in text, f"{script} must create its own environment"
    assert "snakemake all --profile profiles/local" in (ROOT / demo.split()[1]).read_text()
    assert "--report" in (ROOT / demo.split()[1]).read_text()
    assert "pytest" in (ROOT / tests.split()[1]).read_text()
    ci = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith(("#", "set ", "cd "))]
    assert ci == [tests], ci


def test_run_tests_script_fails_when_no_test_is_collected(tmp_path):
    """pytest's exit status 5 (nothing collected) must not pass as success."""
    stub = tmp_path / "repo"
    (stub / "scripts").mkdir(parents=True)
    (stub / "scripts" / "setup_env.sh").write_text("exit 0\n")
    (stub / "scripts" / "run_tests.sh").write_text((ROOT / "scripts/run_tests.sh").read_text())
    (stub / ".venv" / "bin").mkdir(parents=True)
    (stub / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (stub / "tests").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("EPIFLOW_NO_LINT", "EPIFLOW_TEST_WORKERS")}
    proc = subprocess.run(["bash", "scripts/run_tests.sh", "tests", "-p", "no:cacheprovider"], cwd=stub,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "collected no tests" in proc.stderr


def test_run_tests_script_fails_when_the_static_checks_fail(tmp_path):
    """CI's command runs scripts/lint.sh (ruff, mypy) and fails when it fails, even if pytest passed."""
    stub = tmp_path / "repo"
    (stub / "scripts").mkdir(parents=True)
    (stub / "scripts" / "setup_env.sh").write_text("exit 0\n")
    (stub / "scripts" / "lint.sh").write_text("echo lint-ran; exit 1\n")
    (stub / "scripts" / "run_tests.sh").write_text((ROOT / "scripts/run_tests.sh").read_text())
    (stub / ".venv" / "bin").mkdir(parents=True)
    (stub / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (stub / "tests").mkdir()
    (stub / "tests" / "test_ok.py").write_text("def test_ok():\n    assert True\n")
    env = {k: v for k, v in os.environ.items() if k not in ("EPIFLOW_NO_LINT", "EPIFLOW_TEST_WORKERS")}
    proc = subprocess.run(["bash", "scripts/run_tests.sh", "tests", "-p", "no:cacheprovider"], cwd=stub,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and "lint-ran" in proc.stdout, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "static checks failed" in proc.stderr
    assert "scripts/lint.sh" in (ROOT / "scripts" / "run_tests.sh").read_text()


def test_task_dataset_missing_from_the_manifest_is_rejected(tmp_path):
    if not (ROOT.parent / "shared" / "data").exists():
        pytest.skip("config/realdata.yaml reads ../shared/data, which is absent")
    over = _write_config(tmp_path, {"tasks": {"annotation": {"datasets": ["atlas_b9"]}}})
    proc = snakemake("all", "-n", "--configfile", "config/realdata.yaml", str(over))
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0, err
    assert "config key 'tasks.annotation.datasets': 'atlas_b9' is not a dataset of the manifest" in err, err
    assert "buenrostro2018_bm0828" in err  # the known names are listed


def test_two_zeroshot_annotators_each_train_once_and_label_their_datasets(tmp_path):
    """tasks.zeroshot_annotation.annotators (the paper's EpiAgent-B and -NT): one train_annotator job per
    annotator, one annotate_zeroshot job per (annotator, dataset), each naming its annotator as method."""
    over = _write_config(tmp_path, {"tasks": {"zeroshot_annotation": {"annotators": [
        {"name": "EpiAgent-B", "reference": ["atlas_b1"], "datasets": ["atlas_b3"]},
        {"name": "EpiAgent-NT", "reference": ["atlas_b1", "atlas_b2"], "datasets": ["pbmc_fragments", "atlas_b3"],
         "label_key": "lineage"}]}}})
    res = tmp_path / "res"
    proc = snakemake("all", "-n", "-p", "--cores", "2", "--configfile", "config/config.yaml", str(over),
                     "--config", f"results_dir={res}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    shells = [ln[len("Shell command: "):] for ln in out.splitlines() if ln.startswith("Shell command: ")]
    train = sorted(s for s in shells if "epiflow train-annotator" in s)
    assert len(train) == 2, train
    assert "--dataset atlas_b1 " in train[0] and train[0].split("--out ")[1].startswith(
        f"{res}/tasks/zeroshot_annotation/annotator-EpiAgent-B ")
    assert "--dataset atlas_b1,atlas_b2 " in train[1] and "annotator-EpiAgent-NT " in train[1]
    zs = f"{res}/tasks/zeroshot_annotation"
    annotate = {s.split("--out ")[1].split()[0]: s for s in shells if "epiflow annotate-zeroshot" in s}
    assert set(annotate) == {f"{zs}/EpiAgent-B.atlas_b3", f"{zs}/EpiAgent-NT.pbmc_fragments",
                             f"{zs}/EpiAgent-NT.atlas_b3"}, annotate
    b = annotate[f"{zs}/EpiAgent-B.atlas_b3"]
    assert f"--checkpoint {zs}/annotator-EpiAgent-B/checkpoint.pth" in b
    assert "--dataset atlas_b3 " in b and "--method EpiAgent-B " in b
    nt = annotate[f"{zs}/EpiAgent-NT.pbmc_fragments"]
    assert f"--checkpoint {zs}/annotator-EpiAgent-NT/checkpoint.pth" in nt and "--method EpiAgent-NT" in nt
    # the panels of each annotator: EpiAgent-B (fig6c-d) and EpiAgent-NT (fig6f-g), each from its own folders
    assert "rule figure:" in out and f"{res}/figures/fig6d.png" in out and f"{res}/figures/fig6g.png" in out
    six_d = next(s for s in shells if "epiflow figure fig6d " in s)
    six_g = next(s for s in shells if "epiflow figure fig6g " in s)
    assert f"{zs}/EpiAgent-B.atlas_b3/metrics.tsv" in six_d and "EpiAgent-NT" not in six_d
    assert f"{zs}/EpiAgent-NT.pbmc_fragments/metrics.tsv" in six_g and "EpiAgent-B." not in six_g
    # the UMAPs of each annotator's embeddings (fig6b / fig6e) from the cells.tsv of its own folders
    six_b = next(s for s in shells if "epiflow figure fig6b " in s)
    six_e = next(s for s in shells if "epiflow figure fig6e " in s)
    assert f"{zs}/EpiAgent-B.atlas_b3/cells.tsv" in six_b and "EpiAgent-NT" not in six_b
    assert f"{zs}/EpiAgent-NT.pbmc_fragments/cells.tsv" in six_e and "EpiAgent-B." not in six_e


def test_zeroshot_annotator_names_are_checked(tmp_path):
    over = _write_config(tmp_path, {"tasks": {"zeroshot_annotation": {"annotators": [
        {"name": "EpiAgent-B", "reference": ["atlas_b1"], "datasets": ["atlas_b3"]},
        {"name": "EpiAgent-B", "reference": ["atlas_b2"], "datasets": ["atlas_b9"]}]}}})
    proc = snakemake("all", "-n", "--cores", "1", "--configfile", "config/config.yaml", str(over),
                     "--config", f"results_dir={tmp_path / 'res'}")
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0, err
    assert "EpiAgent-B is used twice" in err or "atlas_b9' is not a dataset of the manifest" in err, err
    bad = _write_config(tmp_path, {"tasks": {"zeroshot_annotation": {"annotators": [
        {"name": "Epi Agent", "reference": ["atlas_b1"], "datasets": ["atlas_b3"]}]}}})
    proc = snakemake("all", "-n", "--cores", "1", "--configfile", "config/config.yaml", str(bad))
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "invalid configuration" in err, err
    assert "tasks.zeroshot_annotation.annotators.0.name" in err, err


def test_demo_baselines_plan_snapatac2_and_integrate_the_integration_datasets(tmp_path):
    """The demo's baselines: SnapATAC2 on atlas_b1 (feature extraction; LSI is the task's own there),
    SnapATAC2+SVM (annotation), and SnapATAC2's integration of the integration task's datasets together,
    in one job named after it."""
    proc = snakemake("all", "-n", "-p", "--cores", "1", "--config", f"results_dir={tmp_path / 'res'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [s for s in re.findall(r"^Shell command: (.*)$", proc.stdout + proc.stderr, flags=re.M)
             if "run-baseline" in s]
    demo = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    integ = demo["tasks"]["integration"]
    planned = sorted((re.search(r"--tool (\S+)", c)[1], re.search(r"--task (\S+)", c)[1],
                      re.search(r"--out (\S+)", c)[1].split("/baselines/")[1]) for c in calls)
    assert planned == sorted([("snapatac2", "feature_extraction", "feature_extraction/atlas_b1/snapatac2"),
                              ("snapatac2", "annotation", "annotation/atlas_b1/snapatac2"),
                              ("snapatac2", "integration", f"integration/{integ['name']}/snapatac2")])
    (job,) = [c for c in calls if "--task integration" in c]
    assert f"--dataset {','.join(integ['datasets'])} " in job
    # no perturbation baseline: fig3g reads predict-stimulation's cells.tsv alone
    (fig3g,) = re.findall(r"^Shell command: (.*epiflow figure fig3g .*)$", proc.stdout + proc.stderr, flags=re.M)
    assert "--table stimulation=" in fig3g and "/baselines/" not in fig3g


def _baseline_calls(out: str) -> dict:
    """(tool, task, dataset) -> the run-baseline command of a dry run."""
    calls = {}
    for c in re.findall(r"^Shell command: (.*)$", out, flags=re.M):
        if "run-baseline" in c:
            task, ds, tool = re.search(r"--out (\S+)", c)[1].split("/baselines/")[1].split("/")
            calls[tool, task, ds] = c
    return calls


def test_lsi_tool_runs_only_where_the_feature_extraction_task_does_not_report_lsi(tmp_path):
    """The feature_extraction task reports LSI on its own datasets; the lsi baseline tool there would
    repeat those rows under the same method name (summary.tsv and fig2b had LSI twice). So the tool runs
    on the other baselines.datasets only, and everywhere when the task is off."""
    res = tmp_path / "res"
    over = {"baselines": {"datasets": ["atlas_b1", "atlas_b2"], "tasks": {"feature_extraction": ["lsi", "pca"],
                                                                          "annotation": [], "integration": []}}}

    def planned(over):
        proc = snakemake("all", "-n", "-p", "--cores", "1", "--configfile", "config/config.yaml",
                         str(_write_config(tmp_path, over)), "--config", f"results_dir={res}")
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return sorted(_baseline_calls(proc.stdout + proc.stderr))

    # the demo's feature_extraction task evaluates atlas_b1 (and pbmc_fragments), not atlas_b2
    assert planned(over) == [("lsi", "feature_extraction", "atlas_b2"), ("pca", "feature_extraction", "atlas_b1"),
                             ("pca", "feature_extraction", "atlas_b2")]
    over["tasks"] = {"feature_extraction": {"enabled": False}}
    assert [k for k in planned(over) if k[0] == "lsi"] == [("lsi", "feature_extraction", "atlas_b1"),
                                                           ("lsi", "feature_extraction", "atlas_b2")]


def test_perturbation_baselines_follow_their_tasks(tmp_path):
    """Baselines of `perturbation` run on tasks.stimulation.datasets and of `genetic` on tasks.genetic.datasets
    (none when the task is off), with the settings that define the comparison taken from that task (control
    label, columns, held-out groups, holdout_fraction, min_cells, k, n_top, seed, the GO table, the UMAP
    group); the stimulation jobs also write cells.tsv, which fig3g reads beside predict-stimulation's."""
    res = tmp_path / "res"
    over = {"baselines": {"tasks": {"feature_extraction": ["lsi"], "perturbation": ["scgen", "scpram"],
                                    "genetic": ["gears"]}},
            "tasks": {"stimulation": {"holdout": ["B", "C"], "focus_group": "B", "seed": 3, "control": "rest",
                                      "cell_type_key": "celltype"},
                      "genetic": {"control": "ctrl", "holdout_fraction": 0.5, "min_cells": 5}}}
    proc = snakemake("all", "-n", "-p", "--cores", "1", "--configfile", "config/config.yaml",
                     str(_write_config(tmp_path, over)), "--config", f"results_dir={res}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    calls = _baseline_calls(out)
    for tool in ("scgen", "scpram"):
        args = shlex.split(calls[tool, "perturbation", "stimulation"].split(">")[0])
        assert args[args.index("--dataset") + 1] == "stimulation"
        assert args[args.index("--control") + 1] == "rest" and args[args.index("--label-key") + 1] == "celltype"
        assert args[args.index("--condition-key") + 1] == "condition" and args[args.index("--seed") + 1] == "3"
        assert [args[i + 1] for i, a in enumerate(args) if a == "--holdout"] == ["B", "C"]
        assert args[args.index("--umap-group") + 1] == "B" and args[args.index("--k") + 1] == "100,250,500,1000"
    args = shlex.split(calls["gears", "genetic", "knockout_screen"].split(">")[0])
    assert args[args.index("--control") + 1] == "ctrl" and args[args.index("--holdout-fraction") + 1] == "0.5"
    assert args[args.index("--perturbation-key") + 1] == "perturbation" and args[args.index("--min-cells") + 1] == "5"
    assert "--holdout" not in args  # EpiAgent's seeded split
    assert f'go="{res}/simulate/go.tsv"' in args  # GEARS's GO graph from the genetic task's table
    assert not [k for k in calls if k[1] in ("perturbation", "genetic") and k[2] == "atlas_b1"]
    assert "rule run_baseline_stimulation:" in out
    (fig3g,) = re.findall(r"^Shell command: (.*epiflow figure fig3g .*)$", out, flags=re.M)
    for tool in ("scgen", "scpram"):
        assert f"--table stimulation={res}/baselines/perturbation/stimulation/{tool}/cells.tsv" in fig3g
    assert "--group B" in fig3g
    (fig3h,) = re.findall(r"^Shell command: (.*epiflow figure fig3h .*)$", out, flags=re.M)
    assert f"{res}/baselines/metrics.tsv" in fig3h  # GEARS's rows beside EpiAgent's
    assert "--no-umap" not in args
    # the baselines' own held-out types; a task switched off takes its baselines with it; without the
    # stimulation task's UMAPs the baselines make none either (no cells.tsv, fig3g left out)
    over["baselines"]["holdout"] = {"perturbation": ["C"]}
    over["tasks"]["genetic"]["enabled"] = False
    over["tasks"]["stimulation"]["umap"] = False
    proc = snakemake("all", "-n", "-p", "--cores", "1", "--configfile", "config/config.yaml",
                     str(_write_config(tmp_path, over)), "--config", f"results_dir={res}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    calls = _baseline_calls(out)
    args = shlex.split(calls["scgen", "perturbation", "stimulation"].split(">")[0])
    assert [args[i + 1] for i, a in enumerate(args) if a == "--holdout"] == ["C"]
    assert "--no-umap" in args
    assert not [k for k in calls if k[1] == "genetic"]
    outputs = re.findall(r"^\s+output: (.*/baselines/perturbation/stimulation/scgen/.*)$", out, flags=re.M)
    assert outputs and not [o for o in outputs if "cells.tsv" in o]
    assert not re.findall(r"^Shell command: (.*epiflow figure fig3g .*)$", out, flags=re.M)


def test_files_a_setting_switches_off_are_not_declared(tmp_path):
    """A file that a bool task setting switches off (the registry's `switched`: UMAP tables and figures,
    predicted cells) is neither an output of its rule nor asked for by `all`; the panels drawn from it are
    left out, with the reason in figures/panels.tsv. With the settings on (the demo) they are planned."""
    res = tmp_path / "res"

    def dry(cfg):
        args = ["all", "-n", "-p", "--cores", "2", "--configfile", "config/config.yaml"]
        if cfg:
            args.append(str(_write_config(tmp_path, cfg)))
        proc = snakemake(*args, "--config", f"results_dir={res}")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        return out

    on = dry(None)
    for f in ("stimulation/stimulation/cells.tsv", "stimulation/stimulation/predicted_cells.h5ad", "integration/atlas/cells.tsv",
              "integration/atlas/umap_batch.png", "genetic/knockout_screen/predicted_cells.h5ad"):
        assert f"{res}/tasks/{f}" in on, f
    for panel in ("fig3g", "fig4c", "fig4f"):
        assert f"{res}/figures/{panel}.png" in on
    off_all = dry({"tasks": {"stimulation": {"umap": False, "save_cells": False},
                             "integration": {"umap": False}, "genetic": {"save_cells": False}}})
    # the panels table's job names the missing files in its reasons: the other jobs must not
    off = "\n".join(ln for ln in off_all.splitlines() if "epiflow figure --list" not in ln)
    for f in ("stimulation/stimulation/cells.tsv", "stimulation/stimulation/predicted_cells.h5ad", "integration/atlas/cells.tsv",
              "integration/atlas/umap_batch.png", "integration/atlas/umap_cell_type.png",
              "genetic/knockout_screen/predicted_cells.h5ad"):
        assert f"{res}/tasks/{f}" not in off, f
    assert f"{res}/tasks/stimulation/stimulation/metrics.tsv" in off and f"{res}/tasks/integration/atlas/metrics.tsv" in off
    for panel in ("fig3g", "fig4c", "fig4d", "fig4f", "fig4g"):
        assert f"{res}/figures/{panel}.png" not in off, panel
    assert f"{res}/figures/fig3d.png" in off and f"{res}/figures/fig4e.png" in off
    panels = next(ln for ln in off_all.splitlines() if "epiflow figure --list" in ln)
    assert f"fig3g=no rule of this workflow writes {res}/tasks/stimulation/stimulation/cells.tsv" in panels


def test_every_rule_has_a_log_and_a_benchmark():
    """Each rule that runs something writes a log and a benchmark (`use rule` copies inherit them)."""
    missing = []
    for smk in [ROOT / "workflow/Snakefile", *sorted((ROOT / "workflow/rules").glob("*.smk"))]:
        blocks = re.split(r"^(?=(?:rule|checkpoint) \w+:)", smk.read_text(), flags=re.M)
        for block in blocks[1:]:
            name = re.match(r"(?:rule|checkpoint) (\w+):", block).group(1)
            body = re.split(r"^\S", block.split("\n", 1)[1], maxsplit=1, flags=re.M)[0]
            if name == "all":
                continue
            for key in ("log:", "benchmark:"):
                if not re.search(rf"^    {key}", body, flags=re.M):
                    missing.append(f"{smk.name}: rule {name} has no {key}")
    assert not missing, missing


@pytest.mark.parametrize("over, message", [
    ({"datasets": {"simulate": {"downstream": ["pbmc_fragment"]}}},
     "config key 'datasets.simulate.downstream': pbmc_fragment is not a dataset of the simulated demo"),
    ({"tasks": {"annotation": {"datasets": ["atlas_b9"]}}},
     "config key 'tasks.annotation.datasets': 'atlas_b9' is not a dataset"),
])
def test_demo_dataset_names_are_checked_while_planning(tmp_path, over, message):
    """The demo's dataset names come from its preset: a typo fails the dry run, not a job after the
    simulation."""
    proc = snakemake("all", "-n", "--configfile", "config/config.yaml", str(_write_config(tmp_path, over)),
                     "--config", f"results_dir={tmp_path / 'res'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in out, out[-3000:]


def test_missing_manifest_is_named_by_its_key(tmp_path):
    over = {"datasets": {"manifest": "config/manifests/nope.tsv"}}
    proc = snakemake("all", "-n", "--configfile", "config/config.yaml", str(_write_config(tmp_path, over)),
                     "--config", f"results_dir={tmp_path / 'res'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config key 'datasets.manifest': config/manifests/nope.tsv not found" in out, out[-3000:]
    assert f"working directory {ROOT}" in out


def test_baselines_take_the_settings_their_task_is_scored_with(tmp_path):
    """A baseline of feature extraction, annotation, imputation or integration is given and scored on
    what EpiAgent's task is: the task's scoring settings always; its label column and seed on a dataset
    the task evaluates (the same query cells), baselines.label_key / seed elsewhere; integration takes
    tasks.integration's columns, label map, max_cells and common_ccres (it used baselines.batch_key and
    no label map: another problem than EpiAgent's)."""
    res = tmp_path / "res"
    lm = tmp_path / "map.tsv"
    lm.write_text("source\ttarget\nT0\tA\n")
    over = {"baselines": {"datasets": ["atlas_b1", "atlas_b2"], "label_key": "bl_label", "seed": 9,
                          "tasks": {"feature_extraction": ["pca"], "annotation": ["pca_svm"],
                                    "imputation": ["scopen"], "integration": ["pca"]}},
            "tasks": {"annotation": {"query_fraction": 0.25, "seed": 2, "label_key": "celltype"},
                      "imputation": {"min_cell_fraction": 0.05, "n_pcs": 20, "datasets": ["atlas_b1"]},
                      "feature_extraction": {"n_neighbors": 11},
                      "integration": {"batch_key": "donor", "label_key": "lineage", "max_cells": 500,
                                      "common_ccres": True, "seed": 4, "label_map": str(lm)}}}
    proc = snakemake("all", "-n", "-p", "--cores", "1", "--configfile", "config/config.yaml",
                     str(_write_config(tmp_path, over)), "--config", f"results_dir={res}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    calls = _baseline_calls(out)

    def args(key):
        a = shlex.split(calls[key].split(">")[0])
        return {f: a[i + 1] if i + 1 < len(a) and not a[i + 1].startswith("--") else True
                for i, f in enumerate(a) if f.startswith("--")}

    a = args(("pca_svm", "annotation", "atlas_b1"))  # the annotation task's dataset: its split
    assert (a["--query-fraction"], a["--seed"], a["--label-key"]) == ("0.25", "2", "celltype")
    a = args(("pca_svm", "annotation", "atlas_b2"))  # not the task's: baselines' column and seed
    assert (a["--query-fraction"], a["--seed"], a["--label-key"]) == ("0.25", "9", "bl_label")
    a = args(("scopen", "imputation", "atlas_b1"))
    assert (a["--min-cell-fraction"], a["--n-pcs"], a["--seed"]) == ("0.05", "20", "0")
    a = args(("pca", "feature_extraction", "atlas_b1"))
    assert (a["--n-neighbors"], a["--max-iter"], a["--label-key"]) == ("11", "30", "cell_type")
    (key,) = [k for k in calls if k[1] == "integration"]
    a = args(key)
    assert (a["--batch-key"], a["--label-key"], a["--max-cells"], a["--seed"]) == ("donor", "lineage", "500", "4")
    assert a["--common-ccres"] is True and a["--label-map"] == str(lm)
