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


def check_dataset_keys(names):
    """Every dataset named in tasks.*.datasets / baselines.datasets must be in the manifest."""
    known = set(names) | {"all"}
    sections = [(f"tasks.{t}.datasets", c) for t, c in config["tasks"].items()]
    sections.append(("baselines.datasets", config["baselines"]))
    problems = [
        f"config key '{key}': '{ds}' is not a dataset of the manifest"
        for key, cfg in sections
        if cfg["enabled"]
        for ds in cfg["datasets"]
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
}


def task_files(names=None):
    """Output files of the enabled tasks (only `names`, e.g. ['metrics.tsv'], if given)."""
    files = []
    for task, (folder, outs) in TASK_OUTPUTS.items():
        cfg = config["tasks"][task]
        if not cfg["enabled"]:
            continue
        for ds in cfg["datasets"]:
            files += [
                f"{R}/tasks/{folder}/{ds}/{name}"
                for name in outs
                if names is None or name in names
            ]
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
        # the verb's default is auto; it rejects an explicit 'auto'
        opt("--device", device_arg(t["device"])),
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
