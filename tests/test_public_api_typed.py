"""The public API of epiflow.model and epiflow.train is annotated (mypy checks those packages in CI,
scripts/lint.sh), and the package ships its py.typed marker."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import epiflow


def _unannotated(obj, name: str) -> list[str]:
    fns = []
    if inspect.isclass(obj):
        fns = [(f"{name}.{n}", f) for n, f in vars(obj).items()
               if inspect.isfunction(f) and (not n.startswith("_") or n == "__init__")]
    elif callable(obj):
        fns = [(name, obj)]
    bad = []
    for n, f in fns:
        sig = inspect.signature(f)
        params = [p.name for p in sig.parameters.values()
                  if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
        if params or (sig.return_annotation is inspect.Signature.empty and not n.endswith("__init__")):
            bad.append(f"{n}({', '.join(params)}){' [return]' if sig.return_annotation is inspect.Signature.empty else ''}")
    return bad


@pytest.mark.parametrize("package", ["epiflow.model", "epiflow.train"])
def test_public_api_is_annotated(package):
    import importlib

    mod = importlib.import_module(package)
    names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
    bad = []
    for n in names:
        obj = getattr(mod, n)
        if not inspect.ismodule(obj):
            bad += _unannotated(obj, f"{package}.{n}")
    assert not bad, "unannotated public API:\n  " + "\n  ".join(bad)


def test_lazy_names_of_epiflow_train_import():
    """``from epiflow.train import FinetuneConfig`` used to recurse without end in the lazy __getattr__."""
    from epiflow.train import FinetuneConfig, embed_cells
    from epiflow.train.finetune import finetune

    assert FinetuneConfig.__module__ == "epiflow.train.finetune" and callable(embed_cells) and callable(finetune)


def test_py_typed_marker_ships():
    assert (Path(epiflow.__file__).parent / "py.typed").is_file()
