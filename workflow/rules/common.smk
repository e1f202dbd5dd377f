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


def mapped_files(wildcards):
    return expand(f"{R}/mapped/{{dataset}}.h5ad", dataset=dataset_names())


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


def feature_datasets():
    return config["tasks"]["feature_extraction"]["datasets"]


def all_targets():
    targets = [f"{R}/corpus"]
    if not EXTERNAL_CHECKPOINT:
        targets += [f"{R}/pretrain/checkpoint.pth", f"{R}/pretrain/loss.png"]
    targets.append(f"{R}/embed/embeddings.h5ad")
    if config["tasks"]["feature_extraction"]["enabled"]:
        for ds in feature_datasets():
            targets += [
                f"{R}/tasks/feature_extraction/{ds}/metrics.tsv",
                f"{R}/tasks/feature_extraction/{ds}/umap.png",
            ]
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
    files = []
    if config["tasks"]["feature_extraction"]["enabled"]:
        files += expand(
            f"{R}/tasks/feature_extraction/{{ds}}/metrics.tsv", ds=feature_datasets()
        )
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
