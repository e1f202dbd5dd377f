"""The task registry and the task settings (issue #18): light to import, consistent with the verbs,
the workflow schema and the panels."""

from __future__ import annotations

import subprocess
import sys

import pytest

from epiflow.tasks import config as C
from epiflow.tasks.registry import TASKS, task_of_metrics, verb_config


def test_registry_and_settings_import_nothing_heavy():
    code = ("import sys, epiflow.tasks.registry, epiflow.cliargs, epiflow.metrics.table; "
            "print(sorted(m for m in ('torch', 'scanpy', 'sklearn', 'anndata') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_task_verb_is_registered_with_its_settings():
    from epiflow.cli import VERB_MODULES

    for task in TASKS.values():
        for verb, cls in task.verbs.items():
            assert verb in VERB_MODULES, verb
            assert C.VERB_CONFIGS[verb] is cls and verb_config(verb) is cls
    assert set(C.VERB_CONFIGS) == {v for t in TASKS.values() for v in t.verbs}
    assert task_of_metrics("query_mapping").key == "integration"
    assert task_of_metrics("nonsense") is None


def test_panels_name_registered_tasks():
    from epiflow.plots.figures import PANELS

    for p in PANELS.values():
        assert p.task_key in TASKS, p.name
        if p.metrics_task:
            assert task_of_metrics(p.metrics_task) is not None, p.name


@pytest.mark.parametrize("verb", sorted(C.VERB_CONFIGS))
def test_every_setting_is_a_flag_of_its_verb(verb):
    """The verb's flags are generated from its settings: each field is a flag, with its default."""
    import dataclasses

    from epiflow.cli import build_parser
    from epiflow.cliargs import flag

    parser = build_parser([verb])
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    vp = sub.choices[verb]
    opts = vp._option_string_actions
    for f in dataclasses.fields(C.VERB_CONFIGS[verb]):
        if not f.metadata.get("cli", True):
            continue
        assert flag(f.name) in opts, f"{verb}: {flag(f.name)}"
    for name in ("--corpus", "--out"):
        assert name in opts or verb == "annotate-zeroshot" and name == "--corpus"


def test_backend_choices_are_the_models_plus_auto():
    from epiflow.model.attention import BACKENDS as MODEL_BACKENDS
    from epiflow.train.config import BACKENDS

    assert BACKENDS[0] == "auto" and set(BACKENDS[1:]) == set(MODEL_BACKENDS)
