"""`epiflow figure` / `summarize` / `baselines-table` (dozens of workflow jobs per run) register only
their own step module, so they start without importing torch; `epiflow --help` lists every step."""

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
