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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epiflow",
        description="EpiAgent for scATAC-seq: corpus, tokenization, model, pretraining, downstream tasks.",
    )
    parser.add_argument("--version", action="version", version=f"epiflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<step>")
    sub.required = True
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) is None:
            continue
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        _check_device(args)
        _check_outputs(args)
        rc = args.func(args)
    except EpiflowError as exc:
        print(f"epiflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # e.g. an output folder that is not writable
        where = exc.filename or "a file"
        print(f"epiflow {args.command}: error: {where}: permission denied ({exc.strerror}). Fix: choose "
              f"a folder you can write to, or fix its permissions.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def _check_outputs(args) -> None:
    """Every verb's output paths (``--out``, ``--report``, ``--stats``) must be writable before any work."""
    from .io import check_writable

    for name in ("out", "report", "stats"):
        v = getattr(args, name, None)
        if isinstance(v, str) and v and v != "-":
            check_writable(v, what=f"--{name} path")


def _check_device(args) -> None:
    """``--device cuda...`` with a torch that has no CUDA (or sees no GPU): a clear error up front."""
    dev = getattr(args, "device", None)
    if not isinstance(dev, str) or not dev.strip().lower().startswith("cuda"):
        return
    import torch

    from .errors import ConfigError

    if not torch.backends.cuda.is_built():
        raise ConfigError(f"--device {dev}: this torch ({torch.__version__}) is built without CUDA",
                          field="device", fix="use --device cpu (or auto), or install a CUDA build of torch")
    n = torch.cuda.device_count()
    if n == 0:
        raise ConfigError(f"--device {dev}: torch sees no CUDA GPU (torch {torch.__version__}, "
                          f"CUDA_VISIBLE_DEVICES={__import__('os').environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
                          field="device", fix="use --device cpu (or auto), or run on a machine with a GPU")
    idx = dev.split(":", 1)[1] if ":" in dev else ""
    if idx.strip().isdigit() and int(idx) >= n:
        raise ConfigError(f"--device {dev}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})",
                          field="device", fix=f"use cuda:0 .. cuda:{n - 1}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
