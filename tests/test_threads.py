"""The CPU thread policy of the CLI (issue #15): passive OpenMP waiting set before torch loads, and
``--threads`` on every verb."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from epiflow import threads
from epiflow.cli import build_parser
from epiflow.errors import ConfigError


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", *threads.THREAD_VARS)}
    env.update(kw)
    return env


def test_configure_env_defaults_and_user_override():
    env = {}
    assert threads.configure_env(env)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.configure_env(env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's value wins


def test_default_threads_follows_omp_num_threads():
    assert threads.default_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert threads.default_threads({"OMP_NUM_THREADS": "4,2"}) == 4  # nested-level syntax
    assert threads.default_threads({"OMP_NUM_THREADS": "0"}) == threads.available_cpus()
    assert threads.default_threads({}) == threads.available_cpus()


def test_every_verb_takes_threads():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert len(sub.choices) > 10
    for name, verb in sub.choices.items():
        assert "--threads" in verb._option_string_actions, name
    args = parser.parse_args(["pretrain", "--corpus", "c", "--out", "o", "--threads", "3"])
    assert args.threads == 3
    assert parser.parse_args(["pretrain", "--corpus", "c", "--out", "o"]).threads is None


def test_bad_threads_is_a_config_error():
    with pytest.raises(ConfigError, match="threads"):
        threads.apply(0)


_PROBE = ("import json, os, sys; sys.argv = ['epiflow'] + sys.argv[1:]; import epiflow.cli as c; "
          "import torch; parser = c.build_parser(); args = parser.parse_args(sys.argv[1:]); "
          "c._threads.apply(args.threads); "
          "print(json.dumps({'policy': os.environ.get('OMP_WAIT_POLICY'), 'torch': torch.get_num_threads(), "
          "'omp': os.environ.get('OMP_NUM_THREADS'), 'parallel': torch.__config__.parallel_info()}))")


def _probe(argv, env):
    r = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cli_sets_wait_policy_before_torch_and_threads():
    # the entry point module sets the policy before torch (and its libgomp) loads
    out = _probe(["pretrain", "--corpus", "c", "--out", "o", "--threads", "1"], _env(OMP_NUM_THREADS="2"))
    assert out["policy"] == "PASSIVE"
    assert out["torch"] == 1 and out["omp"] == "1"  # --threads wins over the environment
    # without --threads: the threads the job was given (Snakemake exports OMP_NUM_THREADS)
    out = _probe(["pretrain", "--corpus", "c", "--out", "o"], _env(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE"))
    assert out["torch"] == 1
    assert out["policy"] == "ACTIVE"  # a user's setting is kept


_POOL_PROBE = ("import json, os, sys; early = os.environ.pop('PROBE_EARLY') == '1'; "
               "sys.argv = ['epiflow'] + sys.argv[1:]; import epiflow.cli as c; import numpy; "
               "early and __import__('numba'); parser = c.build_parser(); args = parser.parse_args(sys.argv[1:]); "
               "env_before = os.environ.get('NUMBA_NUM_THREADS'); "
               "n = c._threads.apply(args.threads); import numba; from numba import njit; "
               "f = njit(parallel=True)(lambda x: x + 1); f(numpy.ones(4)); "  # compiles: numba re-reads its env
               "from epiflow.tokenize.core import _threads; "
               "from epiflow.corpus.readers import FragmentReader; d = c._threads.describe(); "
               "d['n'] = n; d['tokenizer'] = _threads(None); d['reader'] = FragmentReader._budget("
               "type('R', (), {'threads': None})()); print(json.dumps(d))")


@pytest.mark.parametrize("early", ["1", "0"])
@pytest.mark.parametrize("argv, env", [
    (["--threads", "1"], {}),                 # --threads, numpy (and numba) already loaded
    ([], {"OMP_NUM_THREADS": "1"}),          # the threads Snakemake gives the job
])
def test_every_pool_keeps_to_the_threads_given(argv, env, early):
    """numpy's BLAS (loaded before the arguments are parsed, as the verbs' modules do), numba's pool
    (UMAP's kernels; loaded before or after), the tokenizer and the fragment reader all use the one
    thread given, not one per core."""
    out = _probe_pools(["pretrain", "--corpus", "c", "--out", "o", *argv], _env(PROBE_EARLY=early, **env))
    assert out["n"] == 1
    assert out["blas_threads"] in ([1], [])  # [] : a numpy without a BLAS pool
    assert out["numba_threads"] == 1
    assert out["tokenizer"] == 1 and out["reader"] == 1
    # numba not loaded yet: its pool (and child processes) get the count from the environment;
    # loaded: the environment is left as numba started with it (it fails on a changed value)
    assert out["NUMBA_NUM_THREADS"] == (None if early == "1" else "1")


def test_no_threads_given_changes_nothing():
    out = _probe_pools(["pretrain", "--corpus", "c", "--out", "o"], _env(PROBE_EARLY="0"))
    assert out["n"] == threads.available_cpus() and out["NUMBA_NUM_THREADS"] is None
    assert out["tokenizer"] == min(8, threads.available_cpus())


def test_threads_changed_after_numba_started_keep_numba_working():
    """A second apply() in one process (the CLI called twice from Python, as the tests do) with another
    count after numba's pool started: numba still compiles."""
    code = ("import numpy, numba; from epiflow import threads; threads.apply(1); "
            "f = numba.njit(parallel=True)(lambda x: x * 2); f(numpy.ones(8)); threads.apply(2); "
            "g = numba.njit(parallel=True)(lambda x: x * 3); print(float(g(numpy.ones(8)).sum()), "
            "numba.get_num_threads())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    total, n = r.stdout.split()
    assert float(total) == 24.0 and int(n) == min(2, threads.available_cpus())


def _probe_pools(argv, env):
    r = subprocess.run([sys.executable, "-c", _POOL_PROBE, *argv], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


_MALLOC_PROBE = r"""
import ctypes, json, sys
if sys.argv[1] == "cli":
    import epiflow.cli  # noqa: F401  (the entry point applies the allocator policy at import)

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 8 << 20
libc.free(libc.malloc(n))  # with glibc's dynamic threshold this raises the threshold above n
before = libc.mallinfo2().hblkhd
p = libc.malloc(n)
print(json.dumps({"mmapped": libc.mallinfo2().hblkhd - before}))
libc.free(p)
"""


def _mmapped(mode, env):
    r = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, mode], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])["mmapped"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator policy (Linux)")
def test_opt_in_fixed_mmap_threshold():
    """EPIFLOW_MMAP_THRESHOLD: after a large block is freed, glibc's dynamic threshold serves the next
    block of that size from the heap; with the fixed threshold it is mmapped again (and returned to
    the system when freed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "EPIFLOW_MMAP_THRESHOLD")}
    try:
        if _mmapped("plain", env) != 0:
            pytest.skip("this libc does not use a dynamic mmap threshold")
    except (AssertionError, AttributeError):
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    assert _mmapped("cli", {**env, "EPIFLOW_MMAP_THRESHOLD": str(1 << 20)}) >= 8 << 20
    assert _mmapped("cli", env) == 0  # default: glibc's own policy


def test_configure_malloc_respects_the_environment():
    assert threads.configure_malloc({"MALLOC_MMAP_THRESHOLD_": "65536", "EPIFLOW_MMAP_THRESHOLD": "1"}) is None
    assert threads.configure_malloc({}) is None
    assert threads.configure_malloc({"EPIFLOW_MMAP_THRESHOLD": "lots"}) is None


_TRIM_PROBE = r"""
import ctypes, json, sys, time
from epiflow import threads

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
blocks = [libc.malloc(4096) for _ in range(40000)]  # ~160 MB of small blocks: heap, not mmap
for b in blocks:
    libc.memset(b, 1, 4096)
for b in blocks[:-1]:
    libc.free(b)  # the last block pins the heap top: free pages stay in the heap (fragmentation)
before = rss()
threads.start_malloc_trimmer(float(sys.argv[1]) if sys.argv[1] != "env" else None)
t0 = time.process_time()
while time.process_time() - t0 < 1.0:  # the interval is CPU time of the process
    sum(range(1000))
time.sleep(0.3)
print(json.dumps({"before": before, "after": rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator policy (Linux)")
@pytest.mark.parametrize("interval, env_value, trims", [("0.1", None, True), ("env", "0", False), ("env", "0.1", True)])
def test_malloc_trimmer_returns_free_heap_pages(interval, env_value, trims):
    """Issue #15 memory growth: free pages held inside a fragmented heap go back to the system."""
    env = {k: v for k, v in os.environ.items() if k != "EPIFLOW_MALLOC_TRIM_S"}
    if env_value is not None:
        env["EPIFLOW_MALLOC_TRIM_S"] = env_value
    r = subprocess.run([sys.executable, "-c", _TRIM_PROBE, interval], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["before"] > 150  # the freed blocks are still resident
    if trims:
        assert out["after"] < out["before"] - 100
    else:
        assert out["after"] > out["before"] - 20


def test_cli_starts_the_trimmer_once():
    t1 = threads.start_malloc_trimmer(3600.0)
    t2 = threads.start_malloc_trimmer(3600.0)
    assert t1 is not None and t1 is t2 and t1.daemon
