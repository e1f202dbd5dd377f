"""A step registers only its own module (``cli.VERB_MODULES``), so the steps that never need torch
(figures, tables, simulation, mapping, corpus building: dozens of workflow jobs per run) start without
importing it; `epiflow --help` lists every step."""

from __future__ import annotations

import subprocess
import sys

from epiflow import cli


def _choices(parser) -> set[str]:
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(sub.choices)


def test_light_commands_register_alone_and_are_in_the_full_parser():
    full = _choices(cli.build_parser(["--help"]))
    assert len(full) > 20
    for verb in cli.LIGHT_COMMANDS:
        assert verb in full, verb
        light = _choices(cli.build_parser([verb, "--out", "x"]))
        assert verb in light and light < full, (verb, light)
    assert cli._requested_command(["-v", "figure", "fig2b"]) == "figure"
    assert cli._requested_command(["--help"]) is None and cli._requested_command([]) is None


def test_light_command_does_not_import_torch():
    code = ("import sys; from epiflow import cli; cli.build_parser(['figure', '--help']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr


def test_verb_modules_table_matches_what_the_modules_register():
    import importlib

    full = _choices(cli.build_parser(["--help"]))
    assert set(cli.VERB_MODULES) == full
    for verb, module in cli.VERB_MODULES.items():
        assert verb in _choices(cli.build_parser([verb, "--out", "x"])), verb
        assert module in cli.COMMAND_MODULES
    for module in cli.COMMAND_MODULES:  # every module's steps are in the table, under that module
        import argparse

        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        assert all(cli.VERB_MODULES[v] == module for v in sub.choices), module


def test_data_steps_run_without_torch(tmp_path):
    """simulate -> candidate-ccres -> map-dataset (h5ad and fragments) -> build-corpus ->
    tokenize-downstream, with ``import torch`` made to fail: none of them needs it."""
    code = """
import sys
sys.modules["torch"] = None  # any import of torch raises ImportError
from epiflow.cli import main
steps = [
    ["simulate", "--preset", "test", "--n-cells", "150", "--out", "sim"],
    ["candidate-ccres", "--manifest", "sim/manifest.tsv", "--genome", "hg38", "--sources",
     "sim/ccre_sources.bed", "--out", "cand.bed"],
    ["map-dataset", "--manifest", "sim/manifest.tsv", "--dataset", "atlas_b1", "--ccres", "cand.bed",
     "--genome", "hg38", "--no-build-check", "--out", "mapped/atlas_b1.h5ad"],
    ["map-dataset", "--manifest", "sim/manifest.tsv", "--dataset", "pbmc_fragments", "--ccres", "cand.bed",
     "--genome", "hg38", "--no-build-check", "--out", "mapped/pbmc.h5ad"],
    ["build-corpus", "--ccres", "cand.bed", "--mapped", "mapped/atlas_b1.h5ad", "--min-cells-per-ccre", "2",
     "--min-ccres-per-cell", "10", "--out", "corpus"],
    ["tokenize-downstream", "--ccres", "cand.bed", "--mapped", "mapped/pbmc.h5ad", "--corpus", "corpus",
     "--min-ccres-per-cell", "10", "--out", "down"],
]
for argv in steps:
    rc = main(argv)
    if rc:
        sys.exit(f"{argv[0]} exited {rc}")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "corpus" / "corpus.json").exists() and (tmp_path / "down" / "corpus.json").exists()
