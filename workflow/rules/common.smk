# Shared helpers: configuration validation, result paths, dataset names, resources, targets.
import os
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError


def _config_errors(cfg, schema):
    """Human-readable problems of `cfg`, each naming the full key path (e.g. model.num_heads)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for err in sorted(
        validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path))
    ):
        path = ".".join(str(p) for p in err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = sorted(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - set(allowed)):
                full = f"{path}.{key}" if path else str(key)
                problems.append(
                    f"unknown config key '{full}' (allowed here: {', '.join(allowed)})"
                )
        elif err.validator == "required":
            problems.append(f"config key '{path or '<top level>'}': {err.message}")
        else:
            problems.append(f"config key '{path or '<top level>'}': {err.message}")
    return problems


def validate_config(cfg, schema_file):
    """Fail before any job runs when the configuration has a wrong key or type."""
    with open(schema_file) as fh:
        schema = yaml.safe_load(fh)
    problems = _config_errors(cfg, schema)
    if problems:
        raise WorkflowError(
            "invalid configuration:\n  - "
            + "\n  - ".join(problems)
            + "\n(see config/README.md for every key)"
        )


validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))

R = config["results_dir"]
REPO = Path(workflow.basedir).parent
LAUNCHER = str(REPO / "scripts" / "torchrun_launch.sh")

# Jobs call `python -m epiflow`; the package source is put on PYTHONPATH so that the same code runs
# in the project's virtualenv (where it is installed anyway) and in the conda environment of
# envs/epiflow.yaml (--use-conda), which holds only the dependencies.
# (braces doubled: Snakemake formats the prefix like a shell command)
shell.prefix(
    "set -euo pipefail; export PYTHONPATH='%s'${{PYTHONPATH:+:$PYTHONPATH}}; "
    % (REPO / "src")
)
USE_SIMULATED = config["datasets"]["manifest"] is None
EXTERNAL_CHECKPOINT = config["model"]["checkpoint"]


def opt(flag, value):
    """`--flag value` for the command line, or nothing when value is None/empty."""
    if value is None or value == "" or value == []:
        return ""
    if isinstance(value, bool):
        return flag if value else ""
    if isinstance(value, (list, tuple)):
        return f"{flag} " + " ".join(str(v) for v in value)
    return f"{flag} {value}"


def res(rule_name, key):
    """Per-rule threads / mem_mb / runtime from config['resources'] (falling back to 'default')."""
    table = config["resources"]
    return table.get(rule_name, {}).get(key, table["default"][key])


def manifest_file(wildcards=None):
    if USE_SIMULATED:
        return f"{R}/simulate/manifest.tsv"
    return config["datasets"]["manifest"]


def dataset_names(wildcards=None):
    """Names of the manifest's datasets (after the simulation ran, for the demo)."""
    if USE_SIMULATED:
        path = checkpoints.simulate.get().output.manifest
    else:
        path = config["datasets"]["manifest"]
    from epiflow.corpus.manifest import load_manifest

    return [entry.name for entry in load_manifest(path)]


# keys of a task's config naming further datasets (beside `datasets`), checked like them
TASK_DATASET_KEYS = {"integration": ["query"], "zeroshot_annotation": ["reference"]}


def check_dataset_keys(names):
    """Every dataset named in tasks.*.datasets (and .query, .reference) / baselines.datasets must
    be in the manifest."""
    known = set(names) | {"all"}
    sections = [
        (f"tasks.{t}.{key}", c[key], c["enabled"])
        for t, c in config["tasks"].items()
        for key in ["datasets"] + TASK_DATASET_KEYS.get(t, [])
    ]
    zs = config["tasks"]["zeroshot_annotation"]
    sections += [
        (
            f"tasks.zeroshot_annotation.annotators[{a['name']}].{key}",
            a[key],
            zs["enabled"],
        )
        for a in zs.get("annotators") or []
        for key in ("reference", "datasets")
    ]
    sections.append(
        (
            "baselines.datasets",
            config["baselines"]["datasets"],
            config["baselines"]["enabled"],
        )
    )
    problems = [
        f"config key '{key}': '{ds}' is not a dataset of the manifest"
        for key, datasets, enabled in sections
        if enabled
        for ds in datasets
        if ds not in known
    ]
    if problems:
        raise WorkflowError(
            "invalid configuration:\n  - "
            + "\n  - ".join(problems)
            + f"\n(manifest {manifest_file()}: {', '.join(sorted(names))}; or 'all')"
        )


def mapped_files(wildcards):
    names = dataset_names()
    check_dataset_keys(names)
    return expand(f"{R}/mapped/{{dataset}}.h5ad", dataset=names)


def ccre_sources(wildcards=None):
    sources = list(config["vocabulary"]["sources"])
    if USE_SIMULATED:
        sources.insert(0, f"{R}/simulate/ccre_sources.bed")
    return sources


def checkpoint_file(wildcards=None):
    """The model the embeddings come from: published weights, or the workflow's pretraining."""
    if EXTERNAL_CHECKPOINT:
        return EXTERNAL_CHECKPOINT
    return f"{R}/pretrain/checkpoint.pth"


TASK_OUTPUTS = {
    # config key under tasks -> (results subfolder, files of one dataset that `all` asks for)
    "feature_extraction": ("feature_extraction", ["metrics.tsv", "umap.png"]),
    "annotation": ("annotation", ["metrics.tsv", "confusion.png", "sankey.png"]),
    "imputation": ("imputation", ["metrics.tsv", "imputation_box.png"]),
    "stimulation": ("stimulation", ["metrics.tsv", "scatter.png", "direction.png"]),
    "genetic": ("genetic", ["metrics.tsv", "scatter.png", "direction.png"]),
    "integration": (
        "integration",
        ["metrics.tsv", "umap_batch.png", "umap_cell_type.png"],
    ),
    "knockout": (
        "knockout",
        ["metrics.tsv", "knockout_effects.png", "knockout_umap.png"],
    ),
    "zeroshot_annotation": ("zeroshot_annotation", ["metrics.tsv", "confusion.png"]),
}
# Zero-shot annotators (train_annotator in tasks.smk, one job per annotator). By default one, named
# "annotator", from the keys of tasks.zeroshot_annotation (folder {R}/tasks/zeroshot_annotation/annotator, results
# of dataset D in .../zeroshot_annotation/D, method EpiAgent-zeroshot). With
# tasks.zeroshot_annotation.annotators (the paper's EpiAgent-B and -NT), each entry NAME has its own
# reference, datasets and labels (the other keys are shared): folder .../annotator-NAME, results of
# dataset D in .../zeroshot_annotation/NAME.D, method NAME.
ZS_ROOT = f"{R}/tasks/zeroshot_annotation"


def zs_annotators():
    """Annotator folder basename -> its settings (name, method, reference, datasets, label_key,
    label_map, query_label_map, units = {result folder: dataset})."""
    t = config["tasks"]["zeroshot_annotation"]
    named = t.get("annotators") or []
    if not named:
        return {
            "annotator": dict(
                name="annotator",
                method="EpiAgent-zeroshot",
                reference=list(t["reference"]),
                datasets=list(t["datasets"]),
                label_key=t["label_key"],
                label_map=t["label_map"],
                query_label_map=t["query_label_map"],
                units={ds: ds for ds in t["datasets"]},
            )
        }
    names = [a["name"] for a in named]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise WorkflowError(
            f"config tasks.zeroshot_annotation.annotators: the name {', '.join(dup)} is used twice; "
            "give every annotator its own name"
        )
    out = {}
    for a in named:
        out[f"annotator-{a['name']}"] = dict(
            name=a["name"],
            method=a["name"],
            reference=list(a["reference"]),
            datasets=list(a["datasets"]),
            label_key=a.get("label_key") or t["label_key"],
            label_map=a.get("label_map", t["label_map"]),
            query_label_map=a.get("query_label_map", t["query_label_map"]),
            units={f"{a['name']}.{ds}": ds for ds in a["datasets"]},
        )
    return out


def zs_unit(unit):
    """(annotator folder basename, settings, dataset) of a zero-shot result folder."""
    for key, a in zs_annotators().items():
        if unit in a["units"]:
            return key, a, a["units"][unit]
    raise WorkflowError(
        f"'{unit}' is not a zero-shot result folder of this configuration "
        f"(tasks.zeroshot_annotation: {', '.join(u for a in zs_annotators().values() for u in a['units'])})"
    )


def zs_settings(wildcards):
    key = wildcards.zs_annotator
    if key not in zs_annotators():
        raise WorkflowError(
            f"{ZS_ROOT}/{key}: not an annotator of this configuration "
            f"({', '.join(zs_annotators())})"
        )
    return zs_annotators()[key]


def zs_annotator_file(name):
    """Input function: file `name` of the annotator that labels result folder {zs_dataset}."""
    return lambda w: f"{ZS_ROOT}/{zs_unit(w.zs_dataset)[0]}/{name}"


def zs_query_label_map(w):
    a = zs_unit(w.zs_dataset)[1]
    return a["query_label_map"] or a["label_map"] or []


def annotator_dirs():
    """Folders of the trained annotators (their metrics.tsv go into the task table)."""
    return [f"{ZS_ROOT}/{key}" for key in zs_annotators()]


def task_units(task):
    """Result folders of one task: one per dataset; integration: one for all its datasets."""
    cfg = config["tasks"][task]
    if task == "integration":
        return [cfg["name"]]
    if task == "zeroshot_annotation":
        return [u for a in zs_annotators().values() for u in a["units"]]
    return cfg["datasets"]


def task_files(names=None):
    """Output files of the enabled tasks (only `names`, e.g. ['metrics.tsv'], if given)."""
    files = []
    for task, (folder, outs) in TASK_OUTPUTS.items():
        cfg = config["tasks"][task]
        if not cfg["enabled"]:
            continue
        for ds in task_units(task):
            files += [
                f"{R}/tasks/{folder}/{ds}/{name}"
                for name in outs
                if names is None or name in names
            ]
        if task == "zeroshot_annotation":
            files += [f"{d}/metrics.tsv" for d in annotator_dirs()]
    return files


def all_targets():
    targets = [f"{R}/corpus"]
    if not EXTERNAL_CHECKPOINT:
        targets += [f"{R}/pretrain/checkpoint.pth", f"{R}/pretrain/loss.png"]
    targets.append(f"{R}/embed/embeddings.h5ad")
    targets += task_files()
    targets += baseline_targets()
    targets.append(f"{R}/summary.tsv")
    return targets


def external_vocab_files(wildcards=None):
    """The external vocabulary (BED and optional document frequency .npy), if configured."""
    voc = config["vocabulary"]
    if voc["mode"] != "external":
        return {}
    files = {"external_bed": voc["external_bed"]}
    if voc["external_df"]:
        files["external_df"] = voc["external_df"]
    return files


def device_arg(device):
    """config 'auto' -> let the verb choose (CUDA when available)."""
    return None if device in (None, "auto") else device


def pretrain_metrics_file(wildcards=None):
    return [] if EXTERNAL_CHECKPOINT else [f"{R}/pretrain/metrics.csv"]


def task_metrics_files(wildcards=None):
    files = task_files(["metrics.tsv"])
    files += [f for f in baseline_targets() if f == f"{R}/baselines/metrics.tsv"]
    return files


def pretrain_args():
    """`epiflow pretrain` options from config['model'] and config['pretrain']."""
    m, p = config["model"], config["pretrain"]
    parts = [
        f"--model-config {m['preset']}",
        opt("--init", m.get("init")),
        f"--backend {m['backend']}",
        f"--epochs {p['epochs']}",
        opt("--max-steps", p["max_steps"]),
        f"--lr {p['lr']}",
        f"--schedule {p['schedule']}",
        opt("--warmup", p["warmup"]),
        f"--batch-tokens {p['batch_tokens']}",
        opt("--max-cells", p["max_cells"]),
        f"--grad-accum {p['grad_accum']}",
        opt("--max-len", p["max_len"]),
        "--k-schedule " + ",".join(str(k) for k in p["k_schedule"]),
        f"--rlm-epochs {p['rlm_epochs']}",
        opt("--cca-max-pos", p["cca_max_pos"]),
        f"--cca-negatives {p.get('cca_negatives', 'uniform')}",
        f"--w-sr {p.get('w_sr', 1.0)} --w-cca {p.get('w_cca', 1.0)} --w-rlm {p.get('w_rlm', 1.0)}",
        f"--seed {p['seed']}",
        f"--eval-fraction {p['eval_fraction']}",
        f"--ckpt-every {p['ckpt_every']}",
        f"--device {p['device']}",
        f"--precision {p['precision']}",
        f"--num-workers {p['num_workers']}",
        opt("--memory-lean", p["memory_lean"]),
        opt("--gradient-checkpointing", p["gradient_checkpointing"]),
        p["extra_args"],
    ]
    return " ".join(x for x in parts if x)


def finetune_args(task):
    """Options shared by the fine-tuning task verbs (annotate, impute) from config['tasks'][task]."""
    t = config["tasks"][task]
    parts = [
        f"--label-key {t['label_key']}",
        f"--epochs {t['epochs']}",
        f"--lr {t['lr']}",
        f"--batch-size {t['batch_size']}",
        opt("--max-steps", t["max_steps"]),
        f"--seed {t['seed']}",
        f"--device {t['device']}",
        f"--backend {config['model']['backend']}",
        opt("--num-heads", config["model"]["num_heads"]),
    ]
    if task == "annotation":
        parts.append(f"--head {t['head']}")
    if task == "imputation":
        parts.append(f"--min-cell-fraction {t['min_cell_fraction']}")
    return " ".join(p for p in parts if p)


def stimulation_args():
    """`epiflow predict-stimulation` options from config['tasks']['stimulation']."""
    t = config["tasks"]["stimulation"]
    parts = [
        f"--condition-key {t['condition_key']}",
        f"--control {t['control']}",
        f"--cell-type-key {t['cell_type_key']}",
        f"--epochs {t['epochs']}",
        opt("--max-steps", t["max_steps"]),
        f"--batch-size {t['batch_size']}",
        f"--lr {t['lr']}",
        f"--seed {t['seed']}",
        f"--device {t['device']}",
        opt("--num-heads", config["model"]["num_heads"]),
    ]
    return " ".join(p for p in parts if p)


def demo_file(task, key, name):
    """A task's annotation file (config tasks.<task>.<key>); null: the demo's simulate/<name>."""
    path = config["tasks"][task][key]
    if path:
        return path
    if USE_SIMULATED:
        return f"{R}/simulate/{name}"
    raise WorkflowError(
        f"invalid configuration:\n  - config key 'tasks.{task}.{key}' is null: give the file "
        f"(only the simulated demo brings its own {name}), or set tasks.{task}.enabled: false"
    )


def datasets_arg(flag, datasets):
    """`--dataset a,b` for a list of manifest names; nothing for ['all'] (every corpus cell)."""
    if "all" in datasets:
        return ""
    return f"{flag} {','.join(datasets)}"


def genetic_args():
    """`epiflow predict-genetic` options from config['tasks']['genetic']."""
    t = config["tasks"]["genetic"]
    parts = [
        f"--perturbation-key {t['perturbation_key']}",
        f"--control {t['control']}",
        f"--holdout-fraction {t['holdout_fraction']}",
        f"--epochs {t['epochs']}",
        opt("--max-steps", t["max_steps"]),
        f"--batch-size {t['batch_size']}",
        f"--lr {t['lr']}",
        opt("--max-len", t["max_len"]),
        f"--seed {t['seed']}",
        f"--device {t['device']}",
        opt("--num-heads", config["model"]["num_heads"]),
    ]
    return " ".join(p for p in parts if p)


def integration_args():
    """`epiflow integrate` options from config['tasks']['integration']."""
    t = config["tasks"]["integration"]
    parts = [
        datasets_arg("--dataset", t["datasets"]),
        f"--batch-key {t['batch_key']}",
        f"--label-key {t['label_key']}",
        opt("--label-map", t["label_map"]),
        f"--max-steps {t['max_steps']}",
        f"--batch-size {t['batch_size']}",
        f"--lr {t['lr']}",
        f"--max-len {t['max_len']}",
        opt("--max-cells", t["max_cells"]),
        f"--seed {t['seed']}",
        f"--device {t['device']}",
        opt("--num-heads", config["model"]["num_heads"]),
    ]
    return " ".join(p for p in parts if p)


def knockout_args():
    """`epiflow knockout` options from config['tasks']['knockout'] (the TSS file is an input)."""
    t = config["tasks"]["knockout"]
    parts = [
        f"--state-key {t['state_key']}",
        f"--state-a {t['state_a']}",
        f"--state-b {t['state_b']}",
        "--genes " + ",".join(t["genes"]),
        f"--upstream {t['upstream']}",
        f"--downstream {t['downstream']}",
        f"--finetune-steps {t['finetune_steps']}",
        f"--n-reference {t['n_reference']}",
        f"--n-query {t['n_query']}",
        f"--n-random {t['n_random']}",
        f"--seed {t['seed']}",
        f"--device {t['device']}",
        opt("--num-heads", config["model"]["num_heads"]),
    ]
    return " ".join(p for p in parts if p)


def annotator_args(wildcards):
    """`epiflow train-annotator` options from config['tasks']['zeroshot_annotation'] (and the
    annotator's own entry of its `annotators`)."""
    t = config["tasks"]["zeroshot_annotation"]
    a = zs_settings(wildcards)
    parts = [
        datasets_arg("--dataset", a["reference"]),
        f"--label-key {a['label_key']}",
        opt("--label-map", a["label_map"]),
        f"--classifier {t['classifier']}",
        f"--epochs {t['epochs']}",
        opt("--max-steps", t["max_steps"]),
        f"--batch-size {t['batch_size']}",
        f"--lr {t['lr']}",
        opt("--max-cells", t["max_cells"]),
        f"--seed {t['seed']}",
        f"--device {t['device']}",
        opt("--num-heads", config["model"]["num_heads"]),
    ]
    return " ".join(p for p in parts if p)


# ---- baselines (rules in baselines.smk) -------------------------------------------------------
BL = config.get("baselines", {}) or {}
USING_CONDA = "conda" in str(
    getattr(getattr(workflow, "deployment_settings", None), "deployment_method", "")
)


def baseline_env_mode(wildcards):
    if USING_CONDA:
        return "inprocess"  # the job already runs in the tool's conda env
    from epiflow.baselines.base import get_adapter

    spec = get_adapter(wildcards.bl_tool)
    if spec.default_env == "inprocess" and not BL.get("isolate_light", False):
        return "inprocess"
    return "venv"


def baseline_params(wildcards):
    import json

    p = dict((BL.get("params") or {}).get(wildcards.bl_tool, {}) or {})
    if BL.get("genes") and wildcards.bl_task == "annotation":
        p.setdefault("genes", BL["genes"])
    return " ".join(f"--param '{k}={json.dumps(v)}'" for k, v in p.items())


def baseline_targets():
    """Every baseline metrics table of the config, and the merged table."""
    if not BL.get("enabled", False):
        return []
    files = [
        f"{R}/baselines/{task}/{ds}/{tool}/metrics.tsv"
        for task, tools in (BL.get("tasks") or {}).items()
        for ds in BL.get("datasets", ["all"])
        for tool in tools
    ]
    return files + ([f"{R}/baselines/metrics.tsv"] if files else [])
