"""The single command-line entry point: ``epiflow <step> ...``.

Each subpackage that offers steps has a ``cli.py`` with ``register(subparsers)``; heavy imports
happen inside the handlers so that ``epiflow --help`` stays fast. User errors
(:class:`epiflow.errors.EpiflowError`) are printed without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from . import __version__
from .errors import EpiflowError

# Subpackages that contribute steps, in the order they appear in --help.
COMMAND_MODULES = [
    "epiflow.simulate.cli",
    "epiflow.genome.cli",
    "epiflow.corpus.cli",
    "epiflow.tokenize.cli",
    "epiflow.model.cli",
    "epiflow.train.cli",
    "epiflow.tasks.cli",
    "epiflow.tasks.annotation_cli",
    "epiflow.tasks.imputation_cli",
    "epiflow.tasks.perturbation_cli",
    "epiflow.tasks.integration_cli",
    "epiflow.tasks.knockout_cli",
    "epiflow.tasks.zeroshot_cli",
    "epiflow.report.cli",
    "epiflow.plots.cli",
    "epiflow.baselines.cli",
]


# Steps whose module is registered alone when the command line names them: importing every step
# module imports torch (epiflow.model, epiflow.train), seconds per call, and the workflow runs these
# light steps (one job per figure and table) dozens of times. `--help` still lists every step.
LIGHT_COMMANDS = {
    "figure": "epiflow.plots.cli",
    "summarize": "epiflow.report.cli",
    "baselines-table": "epiflow.baselines.cli",
}


def _requested_command(argv: list[str] | None) -> str | None:
    args = sys.argv[1:] if argv is None else argv
    for a in args:
        if a in ("-h", "--help", "--version"):
            return None
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epiflow",
        description="EpiAgent for scATAC-seq: corpus, tokenization, model, pretraining, downstream tasks.",
    )
    parser.add_argument("--version", action="version", version=f"epiflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<step>")
    sub.required = True
    light = LIGHT_COMMANDS.get(_requested_command(argv) or "")
    for name in [light] if light else COMMAND_MODULES:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) is None:
            continue
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        rc = args.func(args)
    except EpiflowError as exc:
        print(f"epiflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
