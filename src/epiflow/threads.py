"""CPU thread and allocator policy of every ``epiflow`` verb (issue #15: training on shared machines).

PyTorch's CPU wheel runs its intra-op parallelism on GNU OpenMP (libgomp). By default libgomp
threads *spin* on a barrier for a while before they sleep, and torch starts one thread per core.
On a node shared with other jobs this collapses: a thread that lost its core to another process
holds up every parallel region, while its siblings burn their own time slices spinning (measured
on the loaded 2-core development machine: a 2-thread step of the tiny model took 16.6 s and 4.3 CPU
s, against 1.5-8 s and 0.65-0.7 CPU s with passive waiting; ``benchmarks/bench_threads.py`` and
``benchmarks/README.md``).

The policy, in three parts:

1. :func:`configure_env`, called by the CLI entry point before anything imports torch (libgomp
   reads its environment once, when it is loaded): ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads
   sleep at once instead of spinning). Set with ``os.environ.setdefault``, so a value exported by
   the user wins.
2. :func:`apply`, called by the CLI once the arguments are parsed: ``--threads N`` goes to
   ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` (for libraries not loaded
   yet, and child processes) and to ``torch.set_num_threads`` (if torch is already loaded). Torch's
   inter-op pool is left alone: it starts only on first use, and epiflow runs no inter-op parallel
   work (``torch.jit.fork``). Without ``--threads`` nothing changes: torch follows
   ``OMP_NUM_THREADS``, which Snakemake exports as the rule's ``threads:`` (so a job uses the
   threads it was given), or takes one thread per core.
3. :func:`start_malloc_trimmer`, started by the CLI: a daemon thread that calls glibc's
   ``malloc_trim(0)`` every ``EPIFLOW_MALLOC_TRIM_S`` seconds of the process's CPU time (default
   10; 0 turns it off), which hands the free pages inside the heap back to the system. A training
   loop whose batches change shape every step fragments glibc's heap (its mmap threshold is
   dynamic: it rises to the size of every large block freed, up to 32 MiB, after which blocks of
   those sizes come from the heap): the demo pretraining went from 1.2 GB RSS after 25 steps to
   1.8 GB after 200 with a constant set of live Python objects and tensors, and on to 3.3 GB after
   1,000; one ``malloc_trim(0)`` brings it back to ~0.4 GB. Trimming after every step, or a low
   fixed mmap threshold (:func:`configure_malloc`, opt-in with ``EPIFLOW_MMAP_THRESHOLD=bytes``, or
   glibc's ``MALLOC_MMAP_THRESHOLD_``), keeps the RSS there but costs +50-90 % CPU per tiny step
   (the pages are faulted in again); the default interval costs 5-10 % and halves the growth rate
   on the demo corpus without stopping it; see ``benchmarks/bench_rss.py``.

Library use (``import epiflow.train``) leaves the process's settings alone; call
``epiflow.threads.apply(n)`` / ``start_malloc_trimmer()`` there to get the same behaviour (the wait
policy only takes effect when set before torch is imported).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# environment defaults read once by the OpenMP runtime when it loads (GNU libgomp in the torch CPU
# wheel; KMP_BLOCKTIME is the Intel OpenMP equivalent, for builds linked against libiomp5)
ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def configure_env(environ=None) -> dict:
    """Set the OpenMP wait-policy defaults (without overriding the user's); returns what is set."""
    env = os.environ if environ is None else environ
    for key, value in ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return {k: env[k] for k in ENV_DEFAULTS}


M_MMAP_THRESHOLD = -3          # mallopt parameter number (malloc.h)
DEFAULT_TRIM_INTERVAL_S = 10.0
_trimmer = None


def _glibc():
    try:
        import ctypes

        libc = ctypes.CDLL(None)
    except OSError:  # pragma: no cover
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "malloc_trim"):
        return None  # pragma: no cover - musl etc.
    return libc


def start_malloc_trimmer(interval_s: float | None = None, environ=None):
    """Start (once per process) the daemon thread that calls ``malloc_trim(0)`` each time the process
    has used ``interval_s`` more seconds of CPU time (default ``EPIFLOW_MALLOC_TRIM_S`` or 10; 0
    turns it off); returns the thread, or None when off / not glibc.

    The interval is CPU time, not wall time, so the cost (the pages handed back are faulted in
    again when the heap reuses them) stays a fixed small share of the work even when the process
    gets a fraction of a core on a loaded machine. ``malloc_trim`` runs without the GIL (a ctypes
    call) and holds glibc's arena lock while it walks the heap."""
    global _trimmer
    import threading
    import time

    env = os.environ if environ is None else environ
    if interval_s is None:
        raw = str(env.get("EPIFLOW_MALLOC_TRIM_S", DEFAULT_TRIM_INTERVAL_S)).strip()
        try:
            interval_s = float(raw)
        except ValueError:
            log.warning("EPIFLOW_MALLOC_TRIM_S=%r is not a number of seconds; not trimming", raw)
            return None
    if interval_s <= 0:
        return None
    if _trimmer is not None and _trimmer.is_alive():
        return _trimmer
    libc = _glibc()
    if libc is None:
        return None
    import ctypes

    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    stop = threading.Event()
    poll = min(1.0, interval_s)

    def run():
        last = time.process_time()
        while not stop.wait(poll):
            now = time.process_time()
            if now - last >= interval_s:
                libc.malloc_trim(0)
                last = time.process_time()

    _trimmer = threading.Thread(target=run, name="epiflow-malloc-trim", daemon=True)
    _trimmer.stop = stop
    _trimmer.start()
    return _trimmer


def configure_malloc(environ=None) -> int | None:
    """Opt-in fixed glibc mmap threshold: ``EPIFLOW_MMAP_THRESHOLD=bytes`` (``mallopt``); returns the
    threshold set, or None (not asked for, ``MALLOC_MMAP_THRESHOLD_`` given, or not glibc)."""
    env = os.environ if environ is None else environ
    if "MALLOC_MMAP_THRESHOLD_" in env:
        return None
    raw = str(env.get("EPIFLOW_MMAP_THRESHOLD", "0")).strip()
    try:
        value = int(raw)
    except ValueError:
        log.warning("EPIFLOW_MMAP_THRESHOLD=%r is not an integer (bytes); using glibc's default", raw)
        return None
    if value <= 0:
        return None
    libc = _glibc()
    if libc is None:  # pragma: no cover
        return None
    import ctypes

    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return value if libc.mallopt(M_MMAP_THRESHOLD, value) == 1 else None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, SLURM and cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(environ=None) -> int:
    """``OMP_NUM_THREADS`` when it is a positive integer (Snakemake sets it to the rule's threads),
    otherwise the available CPUs."""
    n = _given(environ)
    return available_cpus() if n is None else n


def _given(environ=None) -> int | None:
    """``OMP_NUM_THREADS`` when it is a positive integer (its first level), else None."""
    env = os.environ if environ is None else environ
    value = str(env.get("OMP_NUM_THREADS", "")).split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def apply(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads in this process and the processes it starts; returns the count.

    Every pool follows it: the environment (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
    ``OPENBLAS_NUM_THREADS``, ``NUMBA_NUM_THREADS``) for libraries not loaded yet and child
    processes; torch's intra-op pool; the BLAS / OpenMP pools of libraries already loaded (numpy's
    OpenBLAS reads its environment once, when numpy is imported, which the verbs' modules do before
    the arguments are parsed; ``threadpoolctl``); numba's pool (UMAP's kernels, in every kNN graph);
    and epiflow's own (the tokenizer, the fragment reader: :func:`default_threads`).

    ``None``: the count given by ``OMP_NUM_THREADS`` (Snakemake exports the rule's threads) is applied
    the same way to the pools that do not read that variable (numba); without it nothing changes (one
    thread per core; torchrun keeps its own default for its workers) and the available CPUs are
    returned."""
    if threads is None:
        n = _given()
        if n is None:
            return default_threads()
        if "numba" not in sys.modules:
            os.environ.setdefault("NUMBA_NUM_THREADS", str(n))
        _loaded_pools(n, blas=False)
        return n
    n = int(threads)
    if n < 1:
        from .errors import ConfigError

        raise ConfigError(f"--threads must be >= 1, got {threads}", field="threads",
                          fix="give the number of CPU cores the job may use")
    for key in THREAD_VARS:
        # numba reads NUMBA_NUM_THREADS again at each compilation and fails once its pool runs with
        # another size: once loaded, its count is set with numba.set_num_threads only
        if key != "NUMBA_NUM_THREADS" or "numba" not in sys.modules:
            os.environ[key] = str(n)
    _loaded_pools(n, blas=True)
    return n


def _loaded_pools(n: int, blas: bool) -> None:
    """Limit the pools of libraries this process has already loaded to ``n`` threads."""
    torch = sys.modules.get("torch")
    if torch is not None:
        _torch_threads(torch, n)
    numba = sys.modules.get("numba")
    if numba is not None:
        try:
            numba.set_num_threads(max(1, min(n, int(numba.config.NUMBA_NUM_THREADS))))
        except Exception as exc:  # pragma: no cover - a numba without a threading layer
            log.debug("numba threads not set: %s", exc)
    if blas and "numpy" in sys.modules:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            return
        threadpool_limits(limits=n)  # kept for the life of the process


def _torch_threads(torch, n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def describe() -> dict:
    """The settings in effect (for logs and benchmarks)."""
    out = {k: os.environ.get(k) for k in (*ENV_DEFAULTS, *THREAD_VARS, "GOMP_SPINCOUNT")}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
        out["torch_interop_threads"] = torch.get_num_interop_threads()
    numba = sys.modules.get("numba")
    if numba is not None:
        out["numba_threads"] = numba.get_num_threads()
    if "numpy" in sys.modules:
        try:
            from threadpoolctl import threadpool_info

            out["blas_threads"] = sorted({int(p["num_threads"]) for p in threadpool_info()
                                          if p.get("user_api") == "blas"})
        except ImportError:  # pragma: no cover
            pass
    return out
