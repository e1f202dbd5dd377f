"""CPU thread policy of every ``epiflow`` verb (issue #15: training speed on shared machines).

PyTorch's CPU wheel runs its intra-op parallelism on GNU OpenMP (libgomp). By default libgomp
threads *spin* on a barrier for a while before they sleep, and torch starts one thread per core.
On a node shared with other jobs this collapses: a thread that lost its core to another process
holds up every parallel region, while its siblings burn their own time slices spinning (measured
on the 2-core development machine with one competing process: a pretraining step of the tiny model
went from ~0.2 s to 2-4 s, see ``benchmarks/bench_threads.py`` and ``benchmarks/README.md``).

The policy, in two parts:

1. :func:`configure_env`, called by the CLI entry point before anything imports torch (libgomp
   reads its environment once, when it is loaded): ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads
   sleep at once instead of spinning). Set with ``os.environ.setdefault``, so a value exported by
   the user wins.
2. :func:`apply`, called by the CLI once the arguments are parsed: ``--threads N`` goes to
   ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` (for libraries not loaded
   yet, and child processes) and to ``torch.set_num_threads`` (if torch is already loaded), and
   torch's inter-op pool gets one thread (epiflow runs no inter-op parallel work). Without
   ``--threads`` nothing changes: torch follows ``OMP_NUM_THREADS``, which Snakemake exports as the
   rule's ``threads:`` (so a job uses the threads it was given), or one thread per core.

3. :func:`configure_malloc`, also at the entry point: a fixed glibc ``mmap`` threshold (default
   1 MiB; ``mallopt(M_MMAP_THRESHOLD)``), so that every large block (activations, gradients of a
   step) is its own mapping, returned to the system when freed. glibc's default threshold is
   *dynamic*: it rises to the size of every mmapped block freed (up to 32 MiB), after which blocks
   of those sizes come from the heap, and a training loop whose batches change shape every step
   fragments the heap without bound (the demo pretraining went from 1.2 GB RSS after 25 steps to
   1.8 GB after 200 with a constant set of live tensors; see ``benchmarks/bench_threads.py
   --memory``). ``MALLOC_MMAP_THRESHOLD_`` in the environment (glibc's own variable) wins, and
   ``EPIFLOW_MMAP_THRESHOLD=0`` leaves glibc's default.

Library use (``import epiflow.train``) leaves the process's settings alone; call
``epiflow.threads.apply(n)`` there to get the same behaviour (the wait policy only takes effect
when set before torch is imported).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# environment defaults read once by the OpenMP runtime when it loads (GNU libgomp in the torch CPU
# wheel; KMP_BLOCKTIME is the Intel OpenMP equivalent, for builds linked against libiomp5)
ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def configure_env(environ=None) -> dict:
    """Set the OpenMP wait-policy defaults (without overriding the user's); returns what is set."""
    env = os.environ if environ is None else environ
    for key, value in ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return {k: env[k] for k in ENV_DEFAULTS}


M_MMAP_THRESHOLD = -3          # mallopt parameter numbers (malloc.h)
DEFAULT_MMAP_THRESHOLD = 1 << 20


def configure_malloc(environ=None) -> int | None:
    """Fix glibc's mmap threshold (see the module docstring); returns the threshold set, or None when
    left alone (not glibc, ``MALLOC_MMAP_THRESHOLD_`` given, or ``EPIFLOW_MMAP_THRESHOLD=0``)."""
    env = os.environ if environ is None else environ
    if "MALLOC_MMAP_THRESHOLD_" in env:
        return None
    raw = str(env.get("EPIFLOW_MMAP_THRESHOLD", DEFAULT_MMAP_THRESHOLD)).strip()
    try:
        value = int(raw)
    except ValueError:
        log.warning("EPIFLOW_MMAP_THRESHOLD=%r is not an integer (bytes); using glibc's default", raw)
        return None
    if value <= 0:
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # pragma: no cover - musl etc.
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return value if mallopt(M_MMAP_THRESHOLD, value) == 1 else None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, SLURM and cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(environ=None) -> int:
    """``OMP_NUM_THREADS`` when it is a positive integer (Snakemake sets it to the rule's threads),
    otherwise the available CPUs."""
    env = os.environ if environ is None else environ
    value = str(env.get("OMP_NUM_THREADS", "")).split(",")[0].strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return available_cpus()


def apply(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads in this process and the processes it starts; returns the count.

    ``None`` changes nothing (the libraries then follow ``OMP_NUM_THREADS``, which Snakemake sets to
    the rule's threads, or their own default of one thread per core; torchrun keeps its own default
    for its workers) and returns :func:`default_threads`."""
    if threads is None:
        return default_threads()
    n = int(threads)
    if n < 1:
        from .errors import ConfigError

        raise ConfigError(f"--threads must be >= 1, got {threads}", field="threads",
                          fix="give the number of CPU cores the job may use")
    for key in THREAD_VARS:
        os.environ[key] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        _torch_threads(torch, n)
    return n


def _torch_threads(torch, n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:  # only possible before the inter-op pool has started; harmless afterwards
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def describe() -> dict:
    """The settings in effect (for logs and benchmarks)."""
    out = {k: os.environ.get(k) for k in (*ENV_DEFAULTS, *THREAD_VARS, "GOMP_SPINCOUNT")}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
        out["torch_interop_threads"] = torch.get_num_interop_threads()
    return out
