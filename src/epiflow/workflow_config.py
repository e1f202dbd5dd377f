"""Checking the workflow's configuration (``config/*.yaml``) before any job runs: the schema file
``workflow/schemas/config.schema.yaml`` plus the settings of the verbs (declared once, in
``epiflow.tasks.config`` / ``epiflow.train.config``), former key names, numbers YAML read as text.
Plain functions (the workflow's ``common.smk`` calls :func:`check_workflow_config`; tests call it too)."""

from __future__ import annotations

from .errors import ConfigError


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


def _coerce_numbers(cfg, schema):
    """PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string: a number field given a string that parses
    as a number gets that number (a note says so). Returns the notes; changes `cfg` in place.
    """
    notes = []

    def resolve(node):
        while isinstance(node, dict) and "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    def types(node):
        node = resolve(node)
        if not isinstance(node, dict):
            return set()
        t = node.get("type")
        out = {t} if isinstance(t, str) else set(t or [])
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key, []):
                out |= types(sub)
        return out

    def walk(obj, node, path):
        node = resolve(node)
        if not isinstance(node, dict) or not isinstance(obj, dict):
            return
        props = dict(node.get("properties", {}))
        for part in node.get("allOf", []):
            props.update(resolve(part).get("properties", {}))
        for key, value in list(obj.items()):
            sub = props.get(key)
            if sub is None or sub is False:
                continue
            full = f"{path}.{key}" if path else str(key)
            if isinstance(value, dict):
                walk(value, sub, full)
                continue
            if not isinstance(value, str):
                continue
            ts = types(sub)
            if not ts & {"number", "integer"} or "string" in ts:
                continue
            try:
                num = float(value)
            except ValueError:
                continue
            if "number" not in ts:
                if not num.is_integer():
                    continue
                num = int(num)
            obj[key] = num
            notes.append(
                f"config key '{full}': read the string {value!r} as the number {num!r} "
                f"(YAML reads exponents without a dot as text; writing {num!r} avoids this note)"
            )

    walk(cfg, schema, "")
    return notes


def _rename_legacy_task_keys(cfg):
    """Former key names of task settings (e.g. knockout finetune_steps -> max_steps) and of the
    pretraining settings (pretrain.max_cells -> max_batch_cells) are read as the new ones, with a note.
    Both at once: the same value, or the new name at the verb's default (config/config.yaml sets it, a
    user's config merged over it sets the former name), read with a note; two different values are an
    error. Changes `cfg` in place; returns the notes.
    """
    from .cliargs import default_of, legacy_keys
    from .tasks.registry import TASKS
    from .train.config import PretrainConfig

    sections = [("pretrain", cfg.get("pretrain"), [PretrainConfig])]
    sections += [(f"tasks.{key}", (cfg.get("tasks") or {}).get(key), list(task.verbs.values()))
                 for key, task in TASKS.items()]
    notes = []
    for where, sec, classes in sections:
        if not isinstance(sec, dict):
            continue
        for cls in classes:
            for old, new in legacy_keys(cls).items():
                if old not in sec:
                    continue
                if new in sec and sec[new] != sec[old] and sec[new] != default_of(cls, new):
                    raise ConfigError(f"{where}: both '{old}' (the former name, {sec[old]!r}) and '{new}' "
                                      f"({sec[new]!r}) are set", field=f"{where}.{old}",
                                      fix=f"keep only '{new}'")
                sec[new] = sec.pop(old)
                notes.append(
                    f"config key '{where}.{old}' is now '{where}.{new}' (read as such; "
                    "rename it to silence this note)"
                )
    return notes


# keys the workflow no longer reads -> where the setting comes from now (dropped with a note)
RETIRED_KEYS = {
    ("baselines", "condition_key"): "the perturbation baselines take the condition column of "
                                    "tasks.stimulation.condition_key (they follow that task, as the integration "
                                    "baselines follow tasks.integration)",
}


def _drop_retired_keys(cfg) -> list[str]:
    """Keys of :data:`RETIRED_KEYS` are removed from ``cfg`` (in place), each with a note."""
    notes = []
    for (section, key), now in RETIRED_KEYS.items():
        sec = cfg.get(section)
        if isinstance(sec, dict) and key in sec:
            value = sec.pop(key)
            notes.append(f"config key '{section}.{key}' ({value!r}) is no longer read: {now}; remove it to "
                         "silence this note")
    return notes


def check_workflow_config(cfg: dict, schema_file) -> tuple[list[str], list[str]]:
    """``(notes, problems)`` of a workflow configuration against the schema file plus the settings of
    the verbs (:func:`epiflow.tasks.registry.workflow_schema`). Former setting names are renamed and
    numbers written as text (``1e-3``) read as numbers, in ``cfg`` itself, each with a note; a
    problem names the full key path."""
    from .tasks.registry import workflow_schema

    schema = workflow_schema(schema_file)
    notes = _rename_legacy_task_keys(cfg) + _drop_retired_keys(cfg) + _coerce_numbers(cfg, schema)
    problems = _config_errors(cfg, schema)
    return notes, problems or _file_problems(cfg)


def _where(path) -> str:
    import os

    return "" if os.path.isabs(str(path)) else f" (relative paths are read from the working directory {os.getcwd()})"


def missing_manifest_message(manifest) -> str:
    """What the workflow says when a job needs the manifest and its file is not there."""
    return (f"config key 'datasets.manifest': {manifest} not found{_where(manifest)}; give the path of the "
            "manifest file (absolute, or run from the repository)")


def _file_problems(cfg: dict) -> list[str]:
    """The files the configuration names, checked before any job runs: the dataset manifest (read
    whole: a bad manifest is a configuration problem, named as such) and the model preset. A file that
    is not there is not a problem yet (planning a target that does not need it works; the jobs that
    need it say so, naming the key: :func:`missing_manifest_message`)."""
    from pathlib import Path

    from .model.config import PRESETS

    problems = []
    manifest = (cfg.get("datasets") or {}).get("manifest")
    if manifest and Path(manifest).is_file():
        from .corpus.manifest import load_manifest

        try:
            load_manifest(manifest)
        except ConfigError as exc:
            problems.append(f"config key 'datasets.manifest': {exc}")
    preset = (cfg.get("model") or {}).get("preset")
    if isinstance(preset, str) and preset not in PRESETS and not preset.endswith(".json"):
        problems.append(f"config key 'model.preset': unknown preset '{preset}'; use one of "
                        f"{', '.join(PRESETS)}, or the path of a JSON model config (*.json)")
    return problems
