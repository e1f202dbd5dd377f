"""Resident memory over a pretraining run: does RSS grow with the steps? (issue #15)

Runs ``epiflow.train.pretrain`` (tiny model, 4,096 padded tokens per step, CCA + SR + RLM + AdamW,
1 thread) for ``--steps`` steps on a corpus (default: a demo-sized toy corpus, ~4,900 cCREs, ~300
accessible per cell; ``--corpus results/corpus`` for the demo's), once per allocator setting, each
in a fresh process, and records after every step the current RSS (``VmRSS``; with
``trim_each_step`` right after the trim, so the lowest point of the step), the process CPU time,
and every 50 steps the number of live Python objects and torch tensors. Settings:

* ``glibc_default``: glibc as is (dynamic mmap threshold; what every run used before issue #15);
* ``epiflow``: the CLI's policy (:func:`epiflow.threads.start_malloc_trimmer`: ``malloc_trim(0)``
  from a daemon thread every 10 s of process CPU time);
* ``trim_2s``: the same every 2 s of CPU time;
* ``mmap_1m`` / ``mmap_128k``: fixed mmap thresholds (``MALLOC_MMAP_THRESHOLD_``), no trimming;
* ``trim_each_step``: ``malloc_trim(0)`` after every step.

Prints one JSON object: per setting the RSS at a few steps, the peak RSS (``VmHWM``), the growth
between step ``--from-step`` and the last step (MB per 100 steps), CPU seconds per step, and the
object / tensor counts.

    python benchmarks/bench_rss.py --steps 200                    # each setting in turn
    python benchmarks/bench_rss.py --steps 120 --settings glibc_default,epiflow --corpus results/corpus
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "glibc_default": {"EPIFLOW_MALLOC_TRIM_S": "0"},
    "epiflow": {},
    "trim_2s": {"EPIFLOW_MALLOC_TRIM_S": "2"},
    "mmap_1m": {"MALLOC_MMAP_THRESHOLD_": "1048576", "EPIFLOW_MALLOC_TRIM_S": "0"},
    "mmap_128k": {"MALLOC_MMAP_THRESHOLD_": "131072", "EPIFLOW_MALLOC_TRIM_S": "0"},
    "trim_each_step": {"EPIFLOW_MALLOC_TRIM_S": "0", "BENCH_TRIM": "1"},
}
ENV_KEYS = ("MALLOC_MMAP_THRESHOLD_", "EPIFLOW_MMAP_THRESHOLD", "EPIFLOW_MALLOC_TRIM_S", "BENCH_TRIM")


def _rss_mb(field: str = "VmRSS:") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return float(line.split()[1]) / 1024.0
    return float("nan")


def _child(args) -> None:
    import ctypes
    import gc

    from epiflow import threads

    threads.configure_env()
    threads.configure_malloc()
    import torch

    threads.apply(1)
    trimmer = threads.start_malloc_trimmer()
    from epiflow.train.pretrain import PretrainConfig, pretrain
    from epiflow.train import metrics as M

    libc = ctypes.CDLL(None)
    trim = os.environ.get("BENCH_TRIM") == "1"
    rows = []
    log_row = M.MetricsLogger.log

    def log_and_record(self, row):
        if trim:
            libc.malloc_trim(0)
        r = {"step": int(row["step"]), "rss_mb": round(_rss_mb(), 1), "cpu_s": time.process_time()}
        if r["step"] % 50 == 0:
            objs = gc.get_objects()
            r["py_objects"] = len(objs)
            r["tensors"] = sum(1 for o in objs if isinstance(o, torch.Tensor))
        rows.append(r)
        log_row(self, row)

    M.MetricsLogger.log = log_and_record
    pretrain(args.corpus, Path(args.workdir) / f"run_{os.getpid()}", PretrainConfig(
        model_config="tiny", epochs=50, max_steps=args.steps, rlm_epochs=1, batch_tokens=4096, lr=2e-3,
        ckpt_every=0, eval_fraction=0.0, progress=False, device="cpu"))
    by_step = {r["step"]: r for r in rows}
    last = rows[-1]["step"]
    a = by_step[min(args.from_step, last)]
    b = rows[-1]
    keep = sorted({1, 10, 25, 50, 100, 200, 500, 1000, args.from_step, last} & set(by_step))
    print(json.dumps({
        "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "trimmer": trimmer is not None,
        "steps": last,
        "rss_mb_at": {s: by_step[s]["rss_mb"] for s in keep}, "peak_rss_mb": round(_rss_mb("VmHWM:"), 1),
        "growth_mb_per_100_steps": round((b["rss_mb"] - a["rss_mb"]) / max(b["step"] - a["step"], 1) * 100, 1),
        "cpu_s_per_step": round((b["cpu_s"] - a["cpu_s"]) / max(b["step"] - a["step"], 1), 4),
        "py_objects_at": {r["step"]: r["py_objects"] for r in rows if "py_objects" in r},
        "tensors_at": {r["step"]: r["tensors"] for r in rows if "tensors" in r}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--from-step", type=int, default=25, help="growth is measured from this step on")
    ap.add_argument("--settings", default="glibc_default,epiflow,mmap_1m,trim_each_step")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--parallel", action="store_true", help="run the settings at the same time")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    names = [s for s in args.settings.split(",") if s]
    unknown = set(names) - set(SETTINGS)
    if unknown:
        ap.error(f"unknown settings {sorted(unknown)}; choose from {list(SETTINGS)}")
    out = {"steps": args.steps, "from_step": args.from_step, "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as wd:
        corpus = args.corpus
        if corpus is None:
            from epiflow.train.toy import write_toy_corpus

            corpus = str(write_toy_corpus(Path(wd) / "corpus", n_cells=600, n_ccres=4930, n_types=4, seed=0,
                                          shard_size=300, p_in=0.2, p_out=0.01, p_common=0.3, frac_common=0.02))
        base = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
        procs = {}
        for name in names:
            cmd = [sys.executable, __file__, "--child", "--workdir", wd, "--corpus", corpus,
                   "--steps", str(args.steps), "--from-step", str(args.from_step)]
            procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           env={**base, **SETTINGS[name]})
            if not args.parallel:
                procs[name].wait()
        for name, p in procs.items():
            so, se = p.communicate()
            out[name] = json.loads(so.strip().splitlines()[-1]) if p.returncode == 0 else {"error": se[-2000:]}
    out["loadavg_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
