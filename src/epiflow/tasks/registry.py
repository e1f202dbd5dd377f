"""The one registry of the downstream tasks (issue #18): for each config key under ``tasks``, its
verbs and their settings, its results folder, the files of one result folder that the workflow's
``all`` asks for, the ``task`` values of its metrics rows, the baseline task whose tools add rows to
the same comparison, the tables only some of its result folders get, and the files that a bool setting
switches off (the workflow declares them only when it is on).

The workflow's rules (``common.smk``: outputs, argv), the figures (``figures_common.smk``; the panels
of :data:`epiflow.plots.figures.PANELS` name a task key) and the report tables read it. Light: the
workflow imports it while planning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import config as C


@dataclass(frozen=True)
class Task:
    key: str                                  # config key under `tasks`
    folder: str                               # results/tasks/<folder>/<unit>/
    category: str                             # report category of its figures, panels and table
    verbs: dict[str, type]                    # verb -> settings dataclass (the first runs the task)
    outputs: tuple[str, ...]                  # files of one result folder that `all` asks for
    metrics_tasks: tuple[str, ...]            # values of the `task` column of its metrics rows
    baseline_task: str | None = None          # config baselines.tasks key adding rows to its comparison
    partial_tables: dict[str, str] = field(default_factory=dict)  # table -> why no folder may get it
    switched: dict[str, str] = field(default_factory=dict)  # file -> the bool setting without which no folder gets it

    @property
    def verb(self) -> str:
        return next(iter(self.verbs))


TASKS: dict[str, Task] = {t.key: t for t in [
    Task("feature_extraction", "feature_extraction", "Feature extraction",
         {"evaluate-features": C.FeaturesConfig}, ("metrics.tsv", "umap.png"), ("feature_extraction", "trajectory"),
         baseline_task="feature_extraction",
         partial_tables={t: (
             f"no dataset gets a {t}: config tasks.feature_extraction.trajectory.datasets is empty, "
             "so the trajectory (PAGA + pseudotime vs a known order of cell types, e.g. Buenrostro 2018 "
             "haematopoiesis) runs on none (list the evaluated datasets whose cell types follow "
             "tasks.feature_extraction.trajectory.order)") for t in ("trajectory.tsv", "paga.tsv")}),
    Task("annotation", "annotation", "Annotation", {"annotate": C.AnnotationConfig},
         ("metrics.tsv", "confusion.png", "sankey.png"), ("annotation",), baseline_task="annotation"),
    Task("imputation", "imputation", "Imputation", {"impute": C.ImputationConfig},
         ("metrics.tsv", "imputation_box.png"), ("imputation",), baseline_task="imputation"),
    Task("stimulation", "stimulation", "Stimulated perturbation", {"predict-stimulation": C.StimulationConfig},
         ("metrics.tsv", "scatter.png", "direction.png"), ("stimulated_perturbation",),
         baseline_task="perturbation", switched={"cells.tsv": "umap", "predicted_cells.h5ad": "save_cells"}),
    Task("genetic", "genetic", "Genetic perturbation", {"predict-genetic": C.GeneticConfig},
         ("metrics.tsv", "scatter.png", "direction.png"), ("genetic_perturbation",),
         baseline_task="genetic", switched={"predicted_cells.h5ad": "save_cells"}),
    Task("integration", "integration", "Integration", {"integrate": C.IntegrationConfig},
         ("metrics.tsv", "umap_batch.png", "umap_cell_type.png"), ("integration", "query_mapping"),
         baseline_task="integration",
         switched={f: "umap" for f in ("cells.tsv", "umap_batch.png", "umap_cell_type.png")}),
    Task("knockout", "knockout", "Knockout", {"knockout": C.KnockoutConfig},
         ("metrics.tsv", "knockout_effects.png", "knockout_umap.png", "reference_cells.tsv", "shifts.tsv",
          "tss_ccres.tsv"), ("knockout",)),
    Task("zeroshot_annotation", "zeroshot_annotation", "Zero-shot annotation",
         {"train-annotator": C.AnnotatorConfig, "annotate-zeroshot": C.ZeroshotConfig},
         ("metrics.tsv", "confusion.png"), ("zeroshot_annotation",)),
]}


def task_of_metrics(metrics_task: str) -> Task | None:
    """The task whose metrics rows carry ``task`` = ``metrics_task``."""
    for t in TASKS.values():
        if metrics_task in t.metrics_tasks:
            return t
    return None


def partial_tables() -> dict[str, str]:
    """Tables that only some result folders of a task get -> why a configuration may give them to none."""
    return {table: why for t in TASKS.values() for table, why in t.partial_tables.items()}


def verb_config(verb: str) -> type:
    """The settings dataclass of a task verb."""
    for t in TASKS.values():
        if verb in t.verbs:
            return t.verbs[verb]
    raise KeyError(verb)


PRETRAIN_WORKFLOW_KEYS = ("model_config", "backend", "resume", "state_dir", "restart_if_changed", "progress")


def workflow_schema(path) -> dict:
    """The workflow's config schema (``workflow/schemas/config.schema.yaml``) with the settings of each
    task's verbs added to its ``tasks.<task>`` section (:func:`epiflow.cliargs.schema_properties`): the
    settings are declared once, in :mod:`epiflow.tasks.config`; the YAML file declares only the
    workflow's own keys (datasets, files, names)."""
    import yaml

    from ..cliargs import schema_properties

    with open(path) as fh:
        schema = yaml.safe_load(fh)
    from ..train.config import PretrainConfig

    # pretraining: model_config / backend come from the `model` section; the run-control settings
    # (resume, state folder, progress) are the workflow's
    pre = schema["properties"]["pretrain"]["properties"]
    for name, prop in schema_properties(PretrainConfig, exclude=PRETRAIN_WORKFLOW_KEYS).items():
        pre.setdefault(name, prop)
    sections = schema["properties"]["tasks"]["properties"]
    for key, task in TASKS.items():
        props = sections[key]["properties"]
        for cls in task.verbs.values():
            for name, prop in schema_properties(cls).items():
                props.setdefault(name, prop)
    return schema
