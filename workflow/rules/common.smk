# Shared helpers: configuration validation, result paths, dataset names, resources, targets.
import os
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError


def validate_config(cfg, schema_file):
    """Fail before any job runs when the configuration has a wrong key or type
    (epiflow.workflow_config: the schema file + the verbs' settings)."""
    import sys

    from epiflow.errors import ConfigError
    from epiflow.workflow_config import check_workflow_config

    try:
        notes, problems = check_workflow_config(cfg, schema_file)
    except ConfigError as exc:
        raise WorkflowError(f"invalid configuration:\n  - {exc}") from None
    for note in notes:
        print(f"epiflow: note: {note}", file=sys.stderr)
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


# The Python every job runs epiflow with: config `python`, else the one running Snakemake, so
# `.venv/bin/snakemake ...` works without activating .venv; with --sdm conda, `python` of the job's
# conda env. The shell prefix exports it as $EPIFLOW_PYTHON (rules: `"$EPIFLOW_PYTHON" -m epiflow`,
# scripts/torchrun_launch.sh reads it too).
def _job_python():
    import shlex, sys

    sdm = getattr(
        getattr(workflow, "deployment_settings", None), "deployment_method", ""
    )
    py = config.get("python") or ("python" if "conda" in str(sdm) else sys.executable)
    return shlex.quote(str(py)).replace("{", "{{").replace("}", "}}")


# Jobs call `"$EPIFLOW_PYTHON" -m epiflow`; the package source is put on PYTHONPATH so that the same code runs
# in the project's virtualenv (where it is installed anyway) and in the conda environment of
# envs/epiflow.yaml (--use-conda), which holds only the dependencies.
# (braces doubled: Snakemake formats the prefix like a shell command)
shell.prefix(
    "set -euo pipefail; export PYTHONPATH='%s'${{PYTHONPATH:+:$PYTHONPATH}}; "
    "export EPIFLOW_PYTHON=%s; " % (REPO / "src", _job_python())
)
USE_SIMULATED = config["datasets"]["manifest"] is None
EXTERNAL_CHECKPOINT = config["model"]["checkpoint"]


def opt(flag, value):
    """`--flag value` for the command line, or nothing when value is None/empty (values shell-quoted:
    paths may hold spaces)."""
    if value is None or value == "" or value == []:
        return ""
    if isinstance(value, bool):
        return flag if value else ""
    if isinstance(value, (list, tuple)):
        return f"{flag} " + " ".join(shlex.quote(str(v)) for v in value)
    return f"{flag} {shlex.quote(str(value))}"


def res(rule_name, key):
    """Per-rule threads / mem_mb / runtime from config['resources'] (falling back to 'default')."""
    table = config["resources"]
    return table.get(rule_name, {}).get(key, table["default"][key])


def manifest_file(wildcards=None):
    if USE_SIMULATED:
        return f"{R}/simulate/manifest.tsv"
    return config["datasets"]["manifest"]


def manifest_entries():
    """The manifest's datasets (after the simulation ran, for the demo)."""
    if USE_SIMULATED:
        path = checkpoints.simulate.get().output.manifest
    else:
        path = config["datasets"]["manifest"]
        if not os.path.isfile(path):
            from epiflow.workflow_config import missing_manifest_message

            raise WorkflowError(
                f"invalid configuration:\n  - {missing_manifest_message(path)}"
            )
    from epiflow.corpus.manifest import load_manifest

    return load_manifest(path)


def dataset_names(wildcards=None):
    """Names of the manifest's datasets (after the simulation ran, for the demo)."""
    return [entry.name for entry in manifest_entries()]


# ---- corpus vs downstream datasets (manifest column `role`) -----------------------------------
# Corpus datasets make the vocabulary, the document frequency and the pretraining cells
# ({R}/corpus). Downstream datasets are mapped onto the same candidate cCREs and tokenized onto the
# corpus vocabulary with the corpus df (rule downstream_corpus writes one corpus-format folder
# {R}/downstream/<name> each); the tasks find either kind by name through data_dir().
DOWNSTREAM_ROOT = f"{R}/downstream"


def dataset_roles():
    """Dataset name -> 'corpus' | 'downstream'."""
    return {e.name: e.role for e in manifest_entries()}


def corpus_dataset_names():
    return [n for n, r in dataset_roles().items() if r == "corpus"]


def downstream_dataset_names():
    return [n for n, r in dataset_roles().items() if r == "downstream"]


def manifest_known():
    """Whether the manifest can be read while planning: not for the demo (written by rule
    simulate), nor when its file is absent (the jobs that need it report that)."""
    return not USE_SIMULATED and os.path.exists(config["datasets"]["manifest"])


def has_corpus():
    """Whether the run builds a corpus (assumed while the manifest is not known: the demo always does)."""
    return bool(corpus_dataset_names()) if manifest_known() else True


def data_dirs(names, key="the task"):
    """The folders (corpus format) holding the cells of the datasets `names` ('all': every corpus
    cell), in order of first mention: {R}/corpus for corpus datasets, {R}/downstream/<name> for a
    downstream dataset. All share the corpus vocabulary and df, so a verb that takes several
    --corpus paths (integrate) reads them together; the others take one folder (data_dir).
    """
    return list(_data_dirs(names, key))


def _data_dirs(names, key):
    names = [names] if isinstance(names, str) else list(names)
    roles = dataset_roles()
    dirs = {}
    for n in names:
        if n == "all" or roles.get(n) == "corpus":
            if not corpus_dataset_names():
                raise WorkflowError(
                    f"invalid configuration:\n  - {key}: '{n}' needs the corpus, but the manifest "
                    f"{manifest_file()} has no dataset of role 'corpus' (only downstream datasets, "
                    "named one by one)"
                )
            dirs.setdefault(f"{R}/corpus", []).append(n)
        elif roles.get(n) == "downstream":
            dirs.setdefault(f"{DOWNSTREAM_ROOT}/{n}", []).append(n)
        else:
            raise WorkflowError(
                f"invalid configuration:\n  - {key}: '{n}' is not a dataset of the manifest "
                f"{manifest_file()} ({', '.join(sorted(roles))}; or 'all')"
            )
    return dirs


def data_dir(names, key="the task"):
    """The one folder (data_dirs) holding the cells of the datasets `names`: the one place that
    resolves dataset names to shards for a verb that reads one folder; a mix of corpus and
    downstream datasets is an error naming the config key."""
    names = [names] if isinstance(names, str) else list(names)
    dirs = _data_dirs(names, key)
    if len(dirs) > 1:
        raise WorkflowError(
            f"invalid configuration:\n  - {key}: {', '.join(names)} are read together but live in "
            f"different folders ({'; '.join(f'{d}: {v}' for d, v in dirs.items())}): corpus "
            "datasets and each downstream dataset are tokenized separately. List datasets of one "
            "kind (e.g. downstream datasets one at a time; the integration reference and query "
            "may mix them), or give them the same manifest role"
        )
    return next(iter(dirs))


def own_features_input(wildcards):
    """The dataset's own cell x peak h5ad (manifest format h5ad) for the LSI-own-features row
    (tasks.feature_extraction.lsi_own_features), or nothing (fragments, simulated data, or the
    file is not local: map_dataset reports that)."""
    if (
        not config["tasks"]["feature_extraction"].get("lsi_own_features", True)
        or not manifest_known()
    ):
        return []
    from epiflow.corpus.manifest import resolve_dataset

    for entry in manifest_entries():
        if entry.name == wildcards.unit and entry.format == "h5ad" and entry.path:
            try:
                return [
                    str(
                        resolve_dataset(
                            entry,
                            data_mirror=config["data_mirror"],
                            verify=False,
                            local_only=True,
                        )
                    )
                ]
            except Exception:  # not local (still to download): no own-features row
                return []
    return []


def dataset_input(key, *path):
    """Input function: data_dir() of the dataset in wildcard `key` (or of the config list at
    config path `path`)."""

    def f(wildcards):
        if path:
            value = config
            for part in path:
                value = value[part]
            return data_dir(value, ".".join(path))
        return data_dir(wildcards[key], f"dataset {wildcards[key]}")

    return f


def embeddings_file(dataset):
    """Zero-shot embeddings of a dataset's cells: rule embed (corpus) or embed_downstream."""
    if data_dir(dataset).startswith(f"{DOWNSTREAM_ROOT}/"):
        return f"{R}/embed/downstream/{dataset}.h5ad"
    return f"{R}/embed/embeddings.h5ad"


def seen_inputs(wildcards):
    """The folders telling `epiflow summarize` which datasets the model saw in pretraining: the
    corpus (seen, when the workflow pretrained on it) and each downstream folder (never seen).
    """
    return {
        "corpus": [f"{R}/corpus"] if corpus_dataset_names() else [],
        "downstream": [f"{DOWNSTREAM_ROOT}/{d}" for d in downstream_dataset_names()],
    }


def seen_args(wildcards, input):
    """`epiflow summarize` options for its column seen_in_pretraining (inputs of seen_inputs)."""
    # (getattr: while the demo's manifest is pending, the inputs are the checkpoint's placeholder)
    parts = [
        opt("--corpus", list(getattr(input, "corpus", []))),
        opt("--downstream", list(getattr(input, "downstream", []))),
        # an external checkpoint: what it was trained on is not known here
        "--external-checkpoint" if EXTERNAL_CHECKPOINT else "",
    ]
    return " ".join(p for p in parts if p)


def check_roles():
    """A run without corpus datasets must bring its model and vocabulary (nothing to pretrain on)."""
    if has_corpus():
        return
    missing = []
    if not EXTERNAL_CHECKPOINT:
        missing.append(
            "model.checkpoint: no dataset of the manifest has role 'corpus', so there is nothing "
            "to pretrain on; give published or earlier weights"
        )
    voc = config["vocabulary"]
    if voc["mode"] != "external" or not voc["external_df"]:
        missing.append(
            "vocabulary: without corpus datasets the downstream datasets are tokenized onto the "
            "checkpoint's own vocabulary: set vocabulary.mode: external with external_bed and "
            "external_df (its document frequencies)"
        )
    if missing:
        raise WorkflowError(
            "invalid configuration:\n  - "
            + "\n  - ".join(missing)
            + f"\n(manifest {manifest_file()}: every dataset is 'downstream')"
        )


def downstream_vocab_inputs(wildcards):
    """The vocabulary a downstream dataset is tokenized onto: the corpus (vocab.bed, df.npy), or,
    without corpus datasets, the external vocabulary (= the candidates) and its df."""
    if dataset_roles().get(wildcards.dataset) != "downstream":
        raise WorkflowError(
            f"{DOWNSTREAM_ROOT}/{wildcards.dataset}: '{wildcards.dataset}' is not a downstream "
            "dataset of the manifest (column role)"
        )
    if corpus_dataset_names():
        return {"corpus": f"{R}/corpus"}
    check_roles()
    return {"df": config["vocabulary"]["external_df"]}


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


# The demo's datasets are known before its simulation runs (the preset names them): a config naming
# another one fails while planning, not in a job after the simulation.
if USE_SIMULATED:
    from epiflow.simulate.core import dataset_batches
    from epiflow.simulate.presets import get_preset

    _SIM = config["datasets"]["simulate"]
    _DEMO_NAMES = dataset_batches(get_preset(_SIM["preset"]))
    _bad = sorted(set(_SIM.get("downstream") or []) - set(_DEMO_NAMES))
    if _bad:
        raise WorkflowError(
            f"invalid configuration:\n  - config key 'datasets.simulate.downstream': {', '.join(_bad)} "
            f"is not a dataset of the simulated demo (preset {_SIM['preset']}: "
            f"{', '.join(_DEMO_NAMES)})"
        )
    check_dataset_keys(_DEMO_NAMES)


def mapped_files(wildcards):
    """The mapped corpus datasets (downstream datasets never enter the corpus)."""
    check_dataset_keys(dataset_names())
    return expand(f"{R}/mapped/{{dataset}}.h5ad", dataset=corpus_dataset_names())


# ---- semi-synthetic perturbation benchmarks (config perturbation_benchmark) --------------------
PERTURBATION_BENCHMARK_DIR = f"{R}/perturbation_benchmark"
PERTURBATION_BENCHMARK_FILES = ("stimulation.h5ad", "genetic.h5ad")


def generated_data(wildcards=None):
    """Data files that a rule of this workflow writes and the manifest reads (the semi-synthetic
    benchmarks): inputs of the jobs that read manifest datasets, so they run after it.
    """
    if not config["perturbation_benchmark"]["enabled"]:
        return []
    return [f"{PERTURBATION_BENCHMARK_DIR}/{f}" for f in PERTURBATION_BENCHMARK_FILES]


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


# config key under tasks -> (results subfolder, files of one result folder that `all` asks for),
# from the one task registry (epiflow.tasks.registry), which the figures and tables read too
from epiflow.tasks.registry import TASKS
from epiflow.baselines.cli import task_scoring_settings

TASK_OUTPUTS = {key: (t.folder, list(t.outputs)) for key, t in TASKS.items()}
# Zero-shot annotators (train_annotator in tasks.smk, one job per annotator). By default one, named
# "annotator", from the keys of tasks.zeroshot_annotation (folder {R}/tasks/zeroshot_annotation/annotator, results
# of dataset D in .../zeroshot_annotation/D, method EpiAgent-zeroshot). With
# tasks.zeroshot_annotation.annotators (the paper's EpiAgent-B and -NT), each entry NAME has its own
# reference, datasets and labels (the other keys are shared): folder .../annotator-NAME, results of
# dataset D in .../zeroshot_annotation/NAME.D, method NAME.
ZS_ROOT = f"{R}/tasks/zeroshot_annotation"


def task_setting(task, key):
    """A task's setting: its config value, else the default of the first of the task's verbs that
    has it (epiflow.tasks.config: the one place the defaults are declared)."""
    from epiflow.cliargs import default_of

    value = config["tasks"][task].get(key)
    if value is not None:
        return value
    for cls in TASKS[task].verbs.values():
        try:
            return default_of(cls, key)
        except KeyError:
            continue
    raise KeyError(f"tasks.{task}.{key}")


def switched_on(task, name):
    """Whether a result folder of `task` gets file `name`: files that a bool setting switches off
    (the registry's `switched`, e.g. cells.tsv without umap) only when that setting is on.
    """
    setting = TASKS[task].switched.get(os.path.basename(name))
    return setting is None or bool(task_setting(task, setting))


def switched_outputs(task, **files):
    """The named outputs of a rule of `task` that the configuration writes (see switched_on)."""
    return {key: f for key, f in files.items() if switched_on(task, f)}


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
                label_key=task_setting("zeroshot_annotation", "label_key"),
                label_map=t.get("label_map"),
                query_label_map=t.get("query_label_map"),
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
            label_key=a.get("label_key")
            or task_setting("zeroshot_annotation", "label_key"),
            label_map=a.get("label_map", t.get("label_map")),
            query_label_map=a.get("query_label_map", t.get("query_label_map")),
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
    """Input function: file `name` of the annotator that labels result folder {unit}."""
    return lambda w: f"{ZS_ROOT}/{zs_unit(w.unit)[0]}/{name}"


def zs_query_label_map(w):
    a = zs_unit(w.unit)[1]
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
                if (names is None or name in names) and switched_on(task, name)
            ]
        if task == "zeroshot_annotation":
            files += [f"{d}/metrics.tsv" for d in annotator_dirs()]
    return files


def check_task_folders():
    """Before planning (a manifest known at parse time): every task unit's datasets resolve to one
    folder (data_dir), so a mix of corpus and downstream datasets stops the run with its config key.
    """
    if not manifest_known():
        return  # e.g. the demo: its manifest exists only after rule simulate (the jobs check it)
    check_dataset_keys(dataset_names())
    units = []
    for task, cfg in config["tasks"].items():
        if not cfg["enabled"]:
            continue
        if task == "integration":  # reads several folders together (data_dirs)
            data_dirs(cfg["datasets"], "tasks.integration.datasets")
            if cfg["query"]:
                data_dirs(cfg["query"], "tasks.integration.query")
        elif task == "zeroshot_annotation":
            for key, a in zs_annotators().items():
                units.append(
                    (a["reference"], f"tasks.zeroshot_annotation reference of {key}")
                )
                units += [
                    ([d], f"tasks.zeroshot_annotation.datasets") for d in a["datasets"]
                ]
        else:
            units += [([d], f"tasks.{task}.datasets") for d in cfg["datasets"]]
    if BL.get("enabled", False):
        units += [([d], "baselines.datasets") for d in BL.get("datasets", ["all"])]
    for names, key in units:
        data_dir(names, key)


def all_targets():
    check_roles()
    check_task_folders()
    targets = [f"{R}/corpus"] if has_corpus() else []
    if not EXTERNAL_CHECKPOINT:
        targets += [f"{R}/pretrain/checkpoint.pth", f"{R}/pretrain/loss.png"]
    if has_corpus():
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


def verb_args(task, verb=None, **values):
    """The settings flags of a task's verb (epiflow.tasks.registry: TASKS[task].verbs) from config
    tasks.<task> (its keys are the settings' names, epiflow.tasks.config), the model's backend and
    num_heads (config model), and per-job `values`; keys that are not settings of the verb (enabled,
    datasets, files ...) are left out, as are null values (the verb's default). The one
    config-to-command-line builder of the task rules (epiflow.cliargs.to_argv)."""
    from epiflow.cliargs import argv_string

    spec = TASKS[task]
    cls = spec.verbs[verb or spec.verb]
    vals = {
        "backend": config["model"]["backend"],
        "num_heads": config["model"]["num_heads"],
        "progress": False,  # job logs: no progress bars
    }
    vals.update(config["tasks"][task])
    vals.update(values)
    return argv_string(cls, vals)


# settings of evaluate-features from tasks.feature_extraction (the zero-shot embeddings come from
# rule embed; the verb fine-tunes a copy of the checkpoint when epochs > 0); the SR loss of that
# fine-tuning defaults to the one of pretraining
def fe_args(trajectory):
    traj = config["tasks"]["feature_extraction"].get("trajectory") or {}
    return verb_args(
        "feature_extraction",
        sr_objective=config["tasks"]["feature_extraction"].get("sr_objective")
        or pretrain_setting("sr_objective"),
        trajectory=trajectory,
        root_type=traj.get("root_type") if trajectory else None,
        order=traj.get("order") if trajectory else None,
    )


def pretrain_metrics_file(wildcards=None):
    return [] if EXTERNAL_CHECKPOINT else [f"{R}/pretrain/metrics.csv"]


def task_metrics_files(wildcards=None):
    files = task_files(["metrics.tsv"])
    files += [f for f in baseline_targets() if f == f"{R}/baselines/metrics.tsv"]
    return files


def pretrain_setting(key):
    """A pretraining setting: config pretrain.<key>, else PretrainConfig's default."""
    from epiflow.cliargs import default_of
    from epiflow.train.config import PretrainConfig

    value = config["pretrain"].get(key)
    return default_of(PretrainConfig, key) if value is None else value


def pretrain_args():
    """`epiflow pretrain` settings flags from config['pretrain'] (keys = the fields of
    epiflow.train.config.PretrainConfig) and config['model'] (preset, init, backend)."""
    from epiflow.cliargs import argv_string
    from epiflow.train.config import PretrainConfig

    m, p = config["model"], config["pretrain"]
    vals = dict(p, model_config=m["preset"], backend=m["backend"], progress=False)
    parts = [
        argv_string(PretrainConfig, vals),
        opt("--init", m.get("init")),
        p["extra_args"],
    ]
    return " ".join(x for x in parts if x)


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
    # GEARS's GO graph from the genetic task's GO table
    if wildcards.bl_task == "genetic":
        p.setdefault("go", baseline_go(wildcards)[0])
    return " ".join(f"--param '{k}={json.dumps(v)}'" for k, v in p.items())


# baseline task -> the EpiAgent task whose datasets (and, for the perturbations, comparison
# settings) its tools follow; the other baseline tasks run on baselines.datasets
BASELINE_FOLLOWS = {
    "integration": "integration",
    "perturbation": "stimulation",
    "genetic": "genetic",
}
# the settings of an EpiAgent task that a baseline of that task is scored with, as run-baseline
# takes them (the task verb's flag names)
BASELINE_SCORING = {task: names for task, (_, names) in task_scoring_settings().items()}


def baseline_units(task):
    """The dataset folders of a baseline task: baselines.datasets, except for the tasks that
    follow an EpiAgent task (BASELINE_FOLLOWS; none when that task is off): integration baselines
    integrate what the integration task integrates (tasks.integration.datasets, in one job named
    tasks.integration.name), perturbation baselines run on tasks.stimulation.datasets and genetic
    ones on tasks.genetic.datasets (one job each)."""
    follows = BASELINE_FOLLOWS.get(task)
    if follows is None:
        return BL.get("datasets", ["all"])
    t = config["tasks"][follows]
    if not t.get("enabled"):
        return []
    return [t["name"]] if task == "integration" else list(t["datasets"])


def baseline_holdouts(task):
    """The held-out groups of a perturbation baseline: baselines.holdout.<task> (the baselines'
    own, e.g. one cell type where a tool is slow), else the EpiAgent task's holdout (null: the
    runner's default, as the task's: every usable cell type / the seeded split)."""
    own = (BL.get("holdout") or {}).get(task)
    return list(own or task_setting(BASELINE_FOLLOWS[task], "holdout") or [])


def baseline_args(wildcards):
    """The flags of a baseline job that define its comparison, so the tool is given and scored on
    what EpiAgent's task is: for perturbation and genetic the settings of tasks.stimulation /
    tasks.genetic (control label, condition / perturbation column, cell-type column as --label-key,
    held-out groups, genetic holdout_fraction, min_cells, k, n_top, seed); for integration those of
    tasks.integration (label and batch columns, label map, max_cells, common_ccres, seed); for
    feature_extraction / annotation / imputation the task's scoring settings (BASELINE_SCORING) and,
    on a dataset the task evaluates, its label column and seed (else baselines.label_key / seed).
    """
    task = wildcards.bl_task
    if task == "integration":
        # the integration task's own problem: its batches, labels (mapped), cells and cCREs
        flags = [
            (f, task_setting("integration", k))
            for f, k in (
                ("--label-key", "label_key"),
                ("--batch-key", "batch_key"),
                ("--seed", "seed"),
                ("--max-cells", "max_cells"),
                ("--common-ccres", "common_ccres"),
            )
        ]
        flags.append(("--label-map", config["tasks"]["integration"].get("label_map")))
        return " ".join(opt(flag, value) for flag, value in flags)
    if task not in ("perturbation", "genetic"):
        # scored as the EpiAgent task scores its datasets (BASELINE_SCORING: the settings that define
        # the cells, split, features and metrics); on a dataset that task evaluates, also its label
        # column and seed (the same query cells, Leiden seed), else baselines.label_key / seed
        t = config["tasks"][task]
        own = t.get("enabled") and wildcards.bl_dataset in list(t.get("datasets") or [])
        flags = [
            (
                "--label-key",
                (
                    task_setting(task, "label_key")
                    if own
                    else BL.get("label_key", "cell_type")
                ),
            ),
            ("--batch-key", BL.get("batch_key", "batch")),
            ("--seed", int(task_setting(task, "seed") if own else BL.get("seed", 0))),
        ]
        flags += [
            (f"--{k.replace('_', '-')}", task_setting(task, k))
            for k in BASELINE_SCORING[task]
        ]
        return " ".join(opt(flag, value) for flag, value in flags)
    follows = BASELINE_FOLLOWS[task]
    if task == "perturbation":
        flags = [
            ("--label-key", task_setting(follows, "label_key")),
            ("--condition-key", task_setting(follows, "condition_key")),
        ]
        # no UMAPs and no cells.tsv without tasks.stimulation.umap (as predict-stimulation)
        if not task_setting(follows, "umap"):
            flags.append(("--no-umap", True))
        focus = task_setting(follows, "focus_group")
        if focus:  # Fig. 3g: the UMAPs of the type the figure shows
            flags.append(("--umap-group", focus))
    else:
        flags = [
            ("--label-key", BL.get("label_key", "cell_type")),
            ("--perturbation-key", task_setting(follows, "perturbation_key")),
            ("--holdout-fraction", task_setting(follows, "holdout_fraction")),
        ]
    flags += [("--control", task_setting(follows, "control"))]
    flags += [("--holdout", h) for h in baseline_holdouts(task)]
    flags += [
        ("--min-cells", task_setting(follows, "min_cells")),
        ("--k", ",".join(str(k) for k in task_setting(follows, "k"))),
        ("--n-top", task_setting(follows, "n_top")),
        ("--da-tie-correct", task_setting(follows, "da_tie_correct")),
        ("--seed", task_setting(follows, "seed")),
    ]
    return " ".join(opt(flag, value) for flag, value in flags)


def baseline_go(wildcards):
    """The GO table a genetic baseline job reads (its input): baselines.params.<tool>.go, else the
    genetic task's (tasks.genetic.go; the demo's simulated one); nothing for the other tasks.
    """
    if wildcards.bl_task != "genetic":
        return []
    own = ((BL.get("params") or {}).get(wildcards.bl_tool) or {}).get("go")
    return [own or demo_file("genetic", "go", "go.tsv")]


def baseline_dataset_names(wildcards):
    """The manifest datasets a baseline job reads (its unit's datasets)."""
    t = config["tasks"]["integration"]
    if wildcards.bl_task == "integration" and wildcards.bl_dataset == t["name"]:
        return list(t["datasets"])
    return [wildcards.bl_dataset]


def baseline_corpus(wildcards):
    """The folders a baseline job reads: one, or for the integration reference all of its datasets'
    (corpus and downstream folders together, as rule integrate reads them)."""
    names = baseline_dataset_names(wildcards)
    key = f"baselines {wildcards.bl_task} {wildcards.bl_dataset}"
    if wildcards.bl_task == "integration":
        return data_dirs(names, key)
    return [data_dir(names, key)]


def baseline_dataset_arg(wildcards):
    names = baseline_dataset_names(wildcards)
    return "" if names == ["all"] else f"--dataset {','.join(names)}"


def baseline_done_by_task(task, ds, tool):
    """True for the lsi tool in feature extraction on a dataset the feature_extraction task evaluates:
    the task reports LSI there itself (method LSI, recipe tasks.feature_extraction.lsi_recipe), so
    the tool's job would add the same rows a second time under the same name."""
    fe = config["tasks"]["feature_extraction"]
    return (
        task == "feature_extraction"
        and tool == "lsi"
        and bool(fe.get("enabled"))
        and ds in fe.get("datasets", [])
    )


def baseline_targets():
    """Every baseline metrics table of the config, and the merged table (jobs the tasks already
    do, baseline_done_by_task, are left out)."""
    if not BL.get("enabled", False):
        return []
    files = [
        f"{R}/baselines/{task}/{ds}/{tool}/metrics.tsv"
        for task, tools in (BL.get("tasks") or {}).items()
        for ds in baseline_units(task)
        for tool in tools
        if not baseline_done_by_task(task, ds, tool)
    ]
    return files + ([f"{R}/baselines/metrics.tsv"] if files else [])
