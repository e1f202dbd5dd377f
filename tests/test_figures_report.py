"""The HTML report's figures and tables: one report category per benchmark (the paper panels and the
per-benchmark table sit beside the task's own figures), captions saying what was run on what, a table
for every enabled task, and the end-of-run summary printed once by scripts/run_demo.sh."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from epiflow.plots.figures import NOT_DRAWN, PANELS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake")] if (BIN / "snakemake").exists() else [sys.executable, "-m", "snakemake"]


@pytest.fixture(scope="module")
def test_workflow(tmp_path_factory):
    """The workflow parsed with config/test.yaml (no job runs): its rules and Snakefile globals."""
    api_mod = pytest.importorskip("snakemake.api")
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

    workdir = tmp_path_factory.mktemp("report_wf")
    with api_mod.SnakemakeApi(OutputSettings(quiet=set())) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                          config_settings=ConfigSettings(configfiles=[ROOT / "config" / "test.yaml"]),
                          storage_settings=StorageSettings(), snakefile=ROOT / "workflow" / "Snakefile",
                          workdir=workdir)
        workflow = getattr(wf, "_workflow", None)
        if workflow is None:  # pragma: no cover - other Snakemake API
            pytest.skip("this Snakemake version does not expose the parsed workflow")
        yield workflow


def _task_rule_categories(workflow, results_dir: str) -> dict[str, set[str]]:
    """task folder -> report categories the task rules give their own outputs."""
    from snakemake.io import is_flagged

    found: dict[str, set[str]] = {}
    prefix = f"{results_dir}/tasks/"
    for rule in workflow.rules:
        for f in rule.output:
            if str(f).startswith(prefix) and is_flagged(f, "report"):
                folder = str(f)[len(prefix):].split("/")[0]
                found.setdefault(folder, set()).add(f.flags["report"].category)
    return found


def test_panels_and_tables_share_the_task_figures_category(test_workflow):
    g = test_workflow.globals
    R = g["R"]
    cats = _task_rule_categories(test_workflow, R)
    for task, (folder, _) in g["TASK_OUTPUTS"].items():
        assert len(cats.get(folder, ())) == 1, (task, cats.get(folder))
        (expected,) = cats[folder]
        assert g["report_category"](task) == expected
        assert g["table_category"](SimpleNamespace(table=task)) == expected
    # every panel is filed under its task's category: one heading per benchmark in the report
    assert {g["report_category"](p.task_key) for p in PANELS.values()} <= {c for s in cats.values() for c in s}


def test_every_enabled_task_has_a_report_table_in_all(test_workflow):
    g = test_workflow.globals
    R = g["R"]
    tables = g["table_targets"]()
    enabled = [t for t, c in g["config"]["tasks"].items() if c["enabled"]]
    assert set(enabled) <= set(g["TASK_OUTPUTS"])
    assert sorted(tables) == sorted([f"{R}/tables/{t}.tsv" for t in enabled] + [f"{R}/tables/baselines.tsv"])
    all_inputs = {str(f) for f in test_workflow.get_rule("all").input}
    assert set(tables) <= all_inputs
    assert set(g["figure_targets"]()) <= all_inputs
    # the table of a task gathers the metrics of each of its datasets (and the annotators'); the test
    # config has two annotators (EpiAgent-B and -NT analogues), each with its own result folders
    zs = g["table_metrics"]("zeroshot_annotation")
    annotators = g["config"]["tasks"]["zeroshot_annotation"]["annotators"]
    assert [a["name"] for a in annotators] == ["EpiAgent-B", "EpiAgent-NT"]
    for a in annotators:
        assert f"{R}/tasks/zeroshot_annotation/annotator-{a['name']}/metrics.tsv" in zs
        for ds in a["datasets"]:
            assert f"{R}/tasks/zeroshot_annotation/{a['name']}.{ds}/metrics.tsv" in zs
    assert len(zs) == 2 + sum(len(a["datasets"]) for a in annotators)
    rule = test_workflow.get_rule("benchmark_table")
    assert rule.output[0].flags["report"].subcategory == "Tables"


def test_captions_say_what_was_run_on_what(test_workflow):
    g = test_workflow.globals
    cfg = g["config"]
    for name, panel in PANELS.items():
        if g["figure_plan"](name)["problems"]:
            continue
        cap = g["figure_caption"](SimpleNamespace(panel=name))
        assert cap.startswith(panel.title), name
        assert f"config tasks.{panel.task_key}" in cap and panel.paper in cap, name
        units = g["task_units"](panel.task_key)
        assert any(u in cap for u in units), (name, units)
        assert f"'{cfg['model']['preset']}' model" in cap and "simulated demo corpus" in cap
    for table in g["table_targets"]():
        name = Path(table).stem
        cap = g["table_caption"](SimpleNamespace(table=name))
        if name == "baselines":
            tools = [t for v in cfg["baselines"]["tasks"].values() for t in v]
            assert all(t in cap for t in tools) and "model" not in cap
            continue
        assert f"config tasks.{name}" in cap
        for ds in g["task_units"](name):
            assert ds in cap, (name, ds)
    integ = g["table_caption"](SimpleNamespace(table="integration"))
    assert all(q in integ for q in cfg["tasks"]["integration"]["query"])


def test_report_lists_every_paper_panel_drawn_or_not(test_workflow, tmp_path):
    """figures/panels.tsv (rule figure_panels, in `all` and in the report's Summary) lists every panel:
    drawn, not built with this configuration (with the planning problem), not drawable (with the reason)."""
    import shlex

    import pandas as pd

    from epiflow.cli import main

    g = test_workflow.globals
    R = g["R"]
    assert f"{R}/figures/panels.tsv" in {str(f) for f in test_workflow.get_rule("all").input}
    rule = test_workflow.get_rule("figure_panels")
    assert rule.output[0].flags["report"].category == "Summary"
    skipped = g["figure_skipped"]()
    built = {Path(f).stem for f in g["figure_targets"]()}
    assert built | set(skipped) == set(PANELS) and not built & set(skipped)
    cap = g["panels_caption"](None)
    assert f"{len(PANELS) - len(skipped)} drawn" in cap and f"{len(NOT_DRAWN)} paper panels" in cap
    out = tmp_path / "panels.tsv"
    assert main(["figure", "--list", *shlex.split(g["panels_args"](None)), "--out", str(out)]) == 0
    tab = pd.read_csv(out, sep="\t").set_index("panel")
    for name in PANELS:
        status = tab.loc[name, "status"]
        assert status == (f"not built: {skipped[name]}" if name in skipped else "drawn"), (name, status)
    for name, nd in NOT_DRAWN.items():
        assert tab.loc[name, "status"] == f"not drawn: {nd.reason}"


def _summary_table(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("task\tdataset\tmethod\tmetric\tvalue\tsource\n"
                    "feature_extraction\td1\tEpiAgent\tNMI\t0.5\tx.tsv\n")


def _run(args, env_extra=None):
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("EPIFLOW_NO_ONSUCCESS_SUMMARY", None)
    env.update(env_extra or {})
    return subprocess.run([*SNAKEMAKE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_onsuccess_summary_is_printed_unless_the_caller_prints_it(tmp_path):
    """The workflow prints the headline numbers after a successful run; scripts/run_demo.sh turns that
    off (EPIFLOW_NO_ONSUCCESS_SUMMARY=1) because it prints them itself after the report."""
    work, mirror = tmp_path / "work", tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "goa_human.gaf.gz").write_bytes(b"not really gzip")
    _summary_table(work / "results" / "paper" / "summary.tsv")
    target = "results/paper/downloads/goa_human.gaf.gz"
    common = [target, "-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(work), "--cores", "1",
              "--configfile", "config/paper.yaml", "--config", f"data_mirror={mirror}"]
    quiet = _run(common, {"EPIFLOW_NO_ONSUCCESS_SUMMARY": "1"})
    assert quiet.returncode == 0, (quiet.stdout + quiet.stderr)[-3000:]
    assert (work / target).read_bytes() == b"not really gzip"  # copied from data_mirror, no network
    assert "headline numbers" not in quiet.stdout + quiet.stderr
    (work / target).unlink()
    loud = _run(common)
    out = loud.stdout + loud.stderr
    assert loud.returncode == 0, out[-3000:]
    assert out.count("headline numbers") == 1 and "NMI" in out


def test_run_demo_prints_the_summary_once():
    script = (ROOT / "scripts" / "run_demo.sh").read_text()
    lines = [ln.strip() for ln in script.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    first_snakemake = next(i for i, ln in enumerate(lines) if ln.startswith("snakemake "))
    assert any(re.fullmatch(r"export EPIFLOW_NO_ONSUCCESS_SUMMARY=1", ln) for ln in lines[:first_snakemake])
    assert sum("epiflow summarize" in ln for ln in lines) == 1
    assert "epiflow summarize" in lines[-1]  # after the report: the last thing the demo prints
    snakefile = (ROOT / "workflow" / "Snakefile").read_text()
    assert "EPIFLOW_NO_ONSUCCESS_SUMMARY" in snakefile
