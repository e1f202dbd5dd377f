"""The single command-line entry point: ``epiflow <step> ...``.

Each subpackage that offers steps has a ``cli.py`` with ``register(subparsers)``; heavy imports
happen inside the handlers so that ``epiflow --help`` stays fast. User errors
(:class:`epiflow.errors.EpiflowError`) are printed without a traceback and exit with status 2.

Every verb takes ``--threads N`` (CPU threads; default ``OMP_NUM_THREADS``, which Snakemake sets to
the rule's ``threads:``, else the available CPUs) and runs with OpenMP's passive wait policy and a
thread that returns free heap pages to the system every 10 s of CPU time; see
:mod:`epiflow.threads` (issue #15: spinning OpenMP threads collapse on shared machines; the heap of
a training loop grows without the trimming).
"""

from __future__ import annotations

# before anything can import torch: libgomp reads its wait policy once, when it loads (and the
# opt-in fixed glibc mmap threshold must come before the first large allocation)
from . import threads as _threads

_threads.configure_env()
_threads.configure_malloc()

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from . import __version__  # noqa: E402
from .errors import EpiflowError  # noqa: E402

# Subpackages that contribute steps, in the order they appear in --help.
COMMAND_MODULES = [
    "epiflow.simulate.cli",
    "epiflow.genome.cli",
    "epiflow.corpus.cli",
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


# The module that registers each step: the command line names one step, and only its module is
# imported (importing every step module imports torch, seconds per call, and the workflow runs steps
# that never need it, e.g. one job per figure, table or mapped dataset, dozens of times). `--help`, or
# a name not listed here, registers every module. tests/test_cli_light.py keeps this table in step
# with what the modules register.
VERB_MODULES = {
    "simulate": "epiflow.simulate.cli",
    "detect-build": "epiflow.genome.cli",
    "liftover": "epiflow.genome.cli",
    "candidate-ccres": "epiflow.corpus.cli",
    "map-dataset": "epiflow.corpus.cli",
    "build-corpus": "epiflow.corpus.cli",
    "tokenize-downstream": "epiflow.corpus.cli",
    "embed": "epiflow.model.cli",
    "inspect-checkpoint": "epiflow.model.cli",
    "pretrain": "epiflow.train.cli",
    "pretrain-launch": "epiflow.train.cli",
    "evaluate-features": "epiflow.tasks.cli",
    "annotate": "epiflow.tasks.annotation_cli",
    "impute": "epiflow.tasks.imputation_cli",
    "predict-stimulation": "epiflow.tasks.perturbation_cli",
    "predict-genetic": "epiflow.tasks.perturbation_cli",
    "make-perturbation-benchmark": "epiflow.tasks.perturbation_cli",
    "gene-graph": "epiflow.tasks.perturbation_cli",
    "integrate": "epiflow.tasks.integration_cli",
    "knockout": "epiflow.tasks.knockout_cli",
    "train-annotator": "epiflow.tasks.zeroshot_cli",
    "annotate-zeroshot": "epiflow.tasks.zeroshot_cli",
    "summarize": "epiflow.report.cli",
    "figure": "epiflow.plots.cli",
    "run-baseline": "epiflow.baselines.cli",
    "baseline-env": "epiflow.baselines.cli",
    "baselines-table": "epiflow.baselines.cli",
    "list-baselines": "epiflow.baselines.cli",
}
# the steps that never import torch (kept so by tests/test_cli_light.py)
_NO_TORCH = (
    "figure",
    "summarize",
    "baselines-table",
    "simulate",
    "candidate-ccres",
    "map-dataset",
    "build-corpus",
    "tokenize-downstream",
    "detect-build",
    "liftover",
)
LIGHT_COMMANDS = {v: VERB_MODULES[v] for v in _NO_TORCH}


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
    one = VERB_MODULES.get(_requested_command(argv) or "")
    for name in [one] if one else COMMAND_MODULES:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) is None:
            continue
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    for verb in sub.choices.values():
        add_threads_arg(verb)
    return parser


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` on a verb (kept as is where the verb defines its own ``--threads``)."""
    if "--threads" in parser._option_string_actions:
        return
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads (default: $OMP_NUM_THREADS as set by Snakemake, else the "
        "available CPUs); OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE "
        "unless set)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        _check_device(args)
        _check_outputs(args, parser)
        _threads.apply(getattr(args, "threads", None))
        _threads.start_malloc_trimmer()  # free heap pages back to the system every 10 CPU-s
        rc = args.func(args)
    except EpiflowError as exc:
        print(f"epiflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # e.g. an output folder that is not writable
        where = exc.filename or "a file"
        print(
            f"epiflow {args.command}: error: {where}: permission denied ({exc.strerror}). Fix: choose "
            f"a folder you can write to, or fix its permissions.",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def _check_outputs(args, parser: argparse.ArgumentParser | None = None) -> None:
    """Every verb's output paths (``--out``, ``--report``) must be writable before any work,
    and of the kind the flag declares (``--out DIR``: a folder, ``--out FILE``: a file;
    :func:`epiflow.cliargs.out_kind`)."""
    from .cliargs import out_kind
    from .io import check_writable

    verb = None
    if parser is not None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        verb = subs[0].choices.get(args.command) if subs else None
    for name in ("out", "out_dir", "report"):
        v = getattr(args, name, None)
        if isinstance(v, str) and v and v != "-":
            flag = "out" if name == "out_dir" else name  # run-baseline: --out (dest out_dir)
            check_writable(v, what=f"--{flag} path", kind=None if verb is None else out_kind(verb, name))


def _check_device(args) -> None:
    """``--device cuda...`` with a torch that has no CUDA (or sees no GPU): a clear error up front."""
    dev = getattr(args, "device", None)
    if not isinstance(dev, str) or not dev.strip().lower().startswith("cuda"):
        return
    import torch

    from .errors import ConfigError

    if not torch.backends.cuda.is_built():
        raise ConfigError(
            f"--device {dev}: this torch ({torch.__version__}) is built without CUDA",
            field="device",
            fix="use --device cpu (or auto), or install a CUDA build of torch",
        )
    n = torch.cuda.device_count()
    if n == 0:
        raise ConfigError(
            f"--device {dev}: torch sees no CUDA GPU (torch {torch.__version__}, "
            f"CUDA_VISIBLE_DEVICES={__import__('os').environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
            field="device",
            fix="use --device cpu (or auto), or run on a machine with a GPU",
        )
    idx = dev.split(":", 1)[1] if ":" in dev else ""
    if idx.strip().isdigit() and int(idx) >= n:
        raise ConfigError(
            f"--device {dev}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})",
            field="device",
            fix=f"use cuda:0 .. cuda:{n - 1}",
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
