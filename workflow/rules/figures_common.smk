# Helpers for rules/figures.smk: which panels the configuration can build, their
# inputs, command-line arguments, report categories and captions; the per-benchmark tables of
# the report. Panels: epiflow.plots.figures.PANELS.
import os
import shlex

from epiflow.plots.figures import NOT_DRAWN, PANELS

from epiflow.tasks.registry import TASKS, partial_tables, task_of_metrics


def figure_baseline_task(metrics_task):
    """The config baselines.tasks key whose tools add rows to the comparison of a metrics `task`
    (the task registry's baseline_task)."""
    task = task_of_metrics(metrics_task)
    return task.baseline_task if task else None


def _figure_units(task_key):
    """Result folders of a task under the current config (None: task absent or disabled)."""
    cfg = config["tasks"].get(task_key)
    if not cfg or not cfg.get("enabled", False):
        return None
    if "task_units" in globals():
        return list(task_units(task_key))
    return list(cfg["datasets"])


ORDINAL = ["first", "second", "third", "fourth"]


def _annotator_units(index):
    """Result folders of the zero-shot annotator number `index` (0: the first of
    tasks.zeroshot_annotation.annotators, or the single default annotator), or the problem.
    """
    found = list(zs_annotators().values())
    if index >= len(found):
        return None, (
            f"the panel shows the {ORDINAL[index]} zero-shot annotator (EpiAgent-NT in config/paper.yaml) "
            f"but config tasks.zeroshot_annotation has {len(found)} "
            f"({', '.join(a['name'] for a in found)}; list more under annotators)"
        )
    return list(found[index]["units"]), None


def _producible(path):
    return any(r.is_producer(path) for r in workflow.rules if r.name != "figure")


def figure_plan(name):
    """Inputs of panel `name`: {'metrics': [...], 'tables': [(unit, path)], 'problems': [...]}."""
    p = PANELS[name]
    units = _figure_units(p.task_key)
    if units is None:
        return {
            "metrics": [],
            "tables": [],
            "problems": [f"config tasks.{p.task_key} is absent or not enabled"],
        }
    if "annotator" in p.options:
        units, why = _annotator_units(p.options["annotator"])
        if why:
            return {"metrics": [], "tables": [], "problems": [why]}
    folder = TASKS[p.task_key].folder
    base = f"{R}/tasks/{folder}"
    metrics = [f"{base}/{u}/metrics.tsv" for u in units] if p.needs_metrics else []
    bl_task = figure_baseline_task(p.metrics_task)
    bl_table = f"{R}/baselines/metrics.tsv"
    if (
        p.baselines
        and bl_task in (BL.get("tasks") or {})
        and bl_table in baseline_targets()
    ):
        metrics.append(bl_table)
    tables = [(u, f"{base}/{u}/{t}") for u in units for t in p.tables]
    if p.options.get("baseline_tables"):
        tables += baseline_tables(p, units)
    problems = []
    # tables that the config writes for only some datasets of the task (the registry's partial
    # tables, e.g. trajectory.tsv): the panel draws the datasets that have them
    partial = partial_tables()
    for t in sorted(set(p.tables) & set(partial)):
        made = [x for x in tables if os.path.basename(x[1]) != t or _producible(x[1])]
        if not any(os.path.basename(x[1]) == t for x in made):
            problems.append(partial[t])
            made = [x for x in made if os.path.basename(x[1]) != t]
        tables = made
    problems += [
        f"no rule of this workflow writes {f}"
        for f in metrics + [f for _, f in tables]
        if not _producible(f)
    ]
    return {"metrics": metrics, "tables": tables, "problems": problems}


def baseline_tables(p, units):
    """(unit, path) of the same-named tables of the baseline tools of the panel's task on the same
    datasets (fig3g: the perturbation tools' cells.tsv beside predict-stimulation's); none when the
    baselines are off or list no tool for that task."""
    bl_task = TASKS[p.task_key].baseline_task
    tools = (BL.get("tasks") or {}).get(bl_task) or []
    if not BL.get("enabled", False) or not tools:
        return []
    done = set(baseline_units(bl_task))
    return [
        (u, f"{R}/baselines/{bl_task}/{u}/{tool}/{t}")
        for u in units
        if u in done
        for tool in tools
        for t in p.tables
    ]


def figure_targets():
    """Every panel that the current configuration can build."""
    return [
        f"{R}/figures/{name}.png"
        for name in PANELS
        if not figure_plan(name)["problems"]
    ]


def figure_skipped():
    """Panel -> why the current configuration cannot build it (the panels left out of `all`)."""
    out = {}
    for name in PANELS:
        problems = figure_plan(name)["problems"]
        if problems:
            out[name] = "; ".join(problems)
    return out


def panels_args(wildcards):
    """`epiflow figure --list` arguments: the panels this configuration cannot build, with why."""
    return " ".join(
        f"--skip {shlex.quote(f'{name}={why}')}"
        for name, why in figure_skipped().items()
    )


def panels_caption(wildcards):
    skipped = figure_skipped()
    return (
        f"Every result panel of the paper's Figs. 2-6 and what became of it with this configuration: "
        f"{len(PANELS) - len(skipped)} drawn (results/figures/<panel>.png, beside this table in the "
        f"benchmarks' categories), {len(skipped)} not built with this configuration (status 'not "
        f"built: <why>'), and {len(NOT_DRAWN)} paper panels that no table of epiflow can draw "
        "(status 'not drawn: <reason>', column inputs: the drawn panels closest to them). "
        "Names: fig<N><letter> draws the paper's panel, fig<N><letter>_<view> another view of its "
        "data (docs/paper.md). Written by 'epiflow figure --list'."
    )


def figure_inputs(wildcards):
    plan = figure_plan(wildcards.panel)
    if plan["problems"]:
        problems = "\n  - ".join(plan["problems"])
        raise WorkflowError(
            f"figure {wildcards.panel} ({PANELS[wildcards.panel].paper}) cannot be built "
            f"with this configuration:\n  - {problems}\n"
            "(docs/paper.md lists what each panel needs)"
        )
    return {"metrics": plan["metrics"], "tables": [f for _, f in plan["tables"]]}


def figure_args(wildcards):
    plan = figure_plan(wildcards.panel)
    parts = [opt("--metrics", plan["metrics"])]
    parts += [f"--table {shlex.quote(f'{u}={f}')}" for u, f in plan["tables"]]
    p = PANELS[wildcards.panel]
    if p.options.get(
        "per_group"
    ):  # fig3d, fig3g: the held-out type the paper shows (mono-1)
        focus = task_setting(p.task_key, "focus_group")
        if focus:
            parts.append(f"--group {shlex.quote(str(focus))}")
    return " ".join(x for x in parts if x)


def _run_description(with_model=True):
    """The model and corpus the task results come from, for report captions."""
    corpus = (
        "the simulated demo corpus"
        if USE_SIMULATED
        else f"the corpus of {config['datasets']['manifest']}"
    )
    if not with_model:
        return f"{corpus} ({config['genome']})"
    model = (
        f"the published checkpoint {EXTERNAL_CHECKPOINT}"
        if EXTERNAL_CHECKPOINT
        else f"the '{config['model']['preset']}' model pretrained here "
        f"({config['pretrain']['epochs']} epochs)"
    )
    return f"{model} on {corpus} ({config['genome']})"


def report_category(task_key):
    """Report category of a task (the registry's): its figures, panels and table sit under it."""
    return TASKS[task_key].category


def figure_caption(wildcards):
    """What was run on what: the caption of the panel in the HTML report."""
    p = PANELS[wildcards.panel]
    plan = figure_plan(wildcards.panel)
    units = sorted(
        {u for u, _ in plan["tables"]}
        | {os.path.basename(os.path.dirname(f)) for f in plan["metrics"]}
    )
    inputs = ", ".join(
        sorted({os.path.basename(f) for f in plan["metrics"]} | set(p.tables))
    )
    return (
        f"{p.title}. The paper's {p.paper} (docs/paper.md). "
        f"Benchmark: {p.benchmark} (config tasks.{p.task_key}) on {', '.join(units)}, "
        f"with {_run_description()}. "
        f"Drawn by 'epiflow figure {p.name}' from {inputs}."
    )


# ---- per-benchmark tables of the report (results/tables/<task>.tsv) ----------------------------
def table_metrics(name):
    """metrics.tsv files gathered into the report table `name` (a task key, or 'baselines')."""
    if name == "baselines":
        return [f for f in baseline_targets() if f == f"{R}/baselines/metrics.tsv"]
    cfg = config["tasks"].get(name)
    if not cfg or not cfg.get("enabled", False):
        return []
    folder = TASKS[name].folder
    files = [f"{R}/tasks/{folder}/{u}/metrics.tsv" for u in task_units(name)]
    if name == "zeroshot_annotation":
        files += [f"{d}/metrics.tsv" for d in annotator_dirs()]
    return files


def table_targets():
    """One table per enabled task (and one of the baseline tools), for `all` and the report."""
    names = [t for t in TASKS if table_metrics(t)]
    if table_metrics("baselines"):
        names.append("baselines")
    return [f"{R}/tables/{n}.tsv" for n in names]


def table_inputs(wildcards):
    files = table_metrics(wildcards.table)
    if not files:
        raise WorkflowError(
            f"table {wildcards.table}: config tasks.{wildcards.table} is absent or not enabled "
            "(or, for 'baselines', no baseline tool is configured)"
        )
    return files


def table_category(wildcards):
    return (
        "Summary"
        if wildcards.table == "baselines"
        else report_category(wildcards.table)
    )


def table_caption(wildcards):
    """What the report table holds, and what was run on what."""
    files = table_metrics(wildcards.table)
    if wildcards.table == "baselines":
        tools = {t: list(v) for t, v in (BL.get("tasks") or {}).items() if v}
        what = (
            "Every metric of the baseline tools (config baselines.tasks: "
            + "; ".join(f"{t}: {', '.join(v)}" for t, v in tools.items())
            + f") on {', '.join(BL.get('datasets') or [])} of {_run_description(False)}"
        )
    else:
        cfg = config["tasks"][wildcards.table]
        trained = {f"{d}/metrics.tsv" for d in annotator_dirs()}
        units = [
            os.path.basename(os.path.dirname(f)) for f in files if f not in trained
        ]
        extra = ""
        if wildcards.table == "integration" and cfg.get("query"):
            extra = f" (query: {', '.join(cfg['query'])})"
        if wildcards.table == "zeroshot_annotation":
            extra = (
                " ("
                + "; ".join(
                    f"{a['method']} trained on {', '.join(a['reference'])}"
                    for a in zs_annotators().values()
                )
                + "; the annotators' training / validation rows included)"
            )
        what = (
            f"Every metric of the {report_category(wildcards.table)} benchmark "
            f"(config tasks.{wildcards.table}) on {', '.join(units)}{extra}, with "
            f"{_run_description()}"
        )
    return (
        f"{what}: one row per task, dataset, method and metric "
        f"(long format; column source = the metrics.tsv it comes from), gathered by "
        f"'epiflow summarize' from {len(files)} metrics table(s). Column seen_in_pretraining: "
        "true = the dataset's cells were in EpiAgent's pretraining corpus, false = a downstream "
        "dataset it never saw in pretraining, unknown = external weights (a given checkpoint)."
    )
