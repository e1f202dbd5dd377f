# Helpers for rules/figures.smk: which panels the configuration can build, their
# inputs, command-line arguments and report captions. Panels: epiflow.plots.figures.PANELS.
import os

from epiflow.plots.figures import PANELS

# metrics `task` -> config baselines.tasks key whose tools add rows to the same comparison
FIGURE_BASELINE_TASK = {
    "feature_extraction": "feature_extraction",
    "annotation": "annotation",
    "imputation": "imputation",
    "integration": "integration",
    "stimulated_perturbation": "perturbation",
    "genetic_perturbation": "perturbation",
}


def _figure_units(task_key):
    """Result folders of a task under the current config (None: task absent or disabled)."""
    cfg = config["tasks"].get(task_key)
    if not cfg or not cfg.get("enabled", False):
        return None
    if "task_units" in globals():
        return list(task_units(task_key))
    return list(cfg["datasets"])


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
    folder = TASK_OUTPUTS.get(p.task_key, (p.task_key, []))[0]
    base = f"{R}/tasks/{folder}"
    metrics = [f"{base}/{u}/metrics.tsv" for u in units] if p.needs_metrics else []
    bl_task = FIGURE_BASELINE_TASK.get(p.metrics_task)
    bl_table = f"{R}/baselines/metrics.tsv"
    if (
        p.baselines
        and bl_task in (BL.get("tasks") or {})
        and bl_table in baseline_targets()
    ):
        metrics.append(bl_table)
    tables = [(u, f"{base}/{u}/{t}") for u in units for t in p.tables]
    problems = [
        f"no rule of this workflow writes {f}"
        for f in metrics + [f for _, f in tables]
        if not _producible(f)
    ]
    return {"metrics": metrics, "tables": tables, "problems": problems}


def figure_targets():
    """Every panel that the current configuration can build."""
    return [
        f"{R}/figures/{name}.png"
        for name in PANELS
        if not figure_plan(name)["problems"]
    ]


def figure_inputs(wildcards):
    plan = figure_plan(wildcards.panel)
    if plan["problems"]:
        raise WorkflowError(
            f"figure {wildcards.panel} ({PANELS[wildcards.panel].paper}) cannot be built "
            "with this configuration:\n  - "
            + "\n  - ".join(plan["problems"])
            + "\n(docs/paper.md lists what each panel needs)"
        )
    return {"metrics": plan["metrics"], "tables": [f for _, f in plan["tables"]]}


def figure_args(wildcards):
    plan = figure_plan(wildcards.panel)
    parts = [opt("--metrics", plan["metrics"])]
    parts += [f"--table {u}={f}" for u, f in plan["tables"]]
    return " ".join(x for x in parts if x)


def figure_caption(wildcards):
    """What was run on what: the caption of the panel in the HTML report."""
    p = PANELS[wildcards.panel]
    plan = figure_plan(wildcards.panel)
    units = sorted(
        {u for u, _ in plan["tables"]}
        | {os.path.basename(os.path.dirname(f)) for f in plan["metrics"]}
    )
    model = (
        f"the published checkpoint {EXTERNAL_CHECKPOINT}"
        if EXTERNAL_CHECKPOINT
        else f"the '{config['model']['preset']}' model pretrained here "
        f"({config['pretrain']['epochs']} epochs)"
    )
    corpus = (
        "the simulated demo corpus"
        if USE_SIMULATED
        else f"the corpus of {config['datasets']['manifest']}"
    )
    inputs = ", ".join(
        sorted({os.path.basename(f) for f in plan["metrics"]} | set(p.tables))
    )
    return (
        f"{p.title}. Analogue of the paper's {p.paper} (docs/paper.md). "
        f"Benchmark: {p.benchmark} (config tasks.{p.task_key}) on {', '.join(units)}, "
        f"with {model} on {corpus} ({config['genome']}). "
        f"Drawn by 'epiflow figure {p.name}' from {inputs}."
    )
