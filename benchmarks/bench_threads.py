"""CPU thread settings under load: seconds per pretraining step, idle and next to a competing process.

Runs ``epiflow.train.pretrain`` (tiny model, demo-sized corpus: ~4,900 cCREs, ~300 accessible per
cell, 4,096 padded tokens per step, CCA + SR + RLM + AdamW) for ``--steps`` steps, once per thread
setting, each in a fresh process (OpenMP reads its environment when it loads), with and without a
competing load (``--burners`` processes spinning on one core each). Settings:

* ``torch_default``: no OMP variables: torch's default threads (one per core), libgomp's default
  wait policy (spin, then sleep);
* ``snakemake_2``: ``OMP_NUM_THREADS=2`` etc. as Snakemake exports for ``threads: 2`` (this is what
  the demo's jobs ran with);
* ``passive_2``: the same plus ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at once);
* ``spin10k_2``: ``GOMP_SPINCOUNT=10000`` (a short spin, then sleep);
* ``threads_1``: ``OMP_NUM_THREADS=1``;
* ``epiflow``: what the CLI does now (:mod:`epiflow.threads`: ``configure_env`` + ``apply`` with the
  default thread count, under Snakemake's environment for 2 threads): the same as ``passive_2``,
  run as a separate setting to show the run-to-run noise of the machine.

Every (load, setting) pair runs ``--repeats`` times, interleaved, and the load average is recorded
before each run: the development machine is shared, so read the spread as well as the medians.
Prints one JSON object: per run the median seconds per step (after the first two steps), the
process CPU seconds per step (after the first two steps; includes spinning), and the 1-minute
load average; then a summary
table of medians over repeats.

    python benchmarks/bench_threads.py --quick           # 12 steps, 2 repeats, 1 burner
    python benchmarks/bench_threads.py --steps 30 --repeats 3
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

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
              "KMP_BLOCKTIME")


def snakemake_env(n: int) -> dict:
    return {k: str(n) for k in THREAD_ENV[:6]}


SETTINGS = {
    "torch_default": {},
    "snakemake_2": snakemake_env(2),
    "passive_2": {**snakemake_env(2), "OMP_WAIT_POLICY": "PASSIVE"},
    "spin10k_2": {**snakemake_env(2), "GOMP_SPINCOUNT": "10000"},
    "threads_1": snakemake_env(1),
    "epiflow": snakemake_env(2),  # + epiflow.threads in the child
}


def _child(args) -> None:
    if args.policy:
        from epiflow import threads

        threads.configure_env()
        threads.apply(None)
    import pandas as pd
    import torch

    from epiflow.train.pretrain import PretrainConfig, pretrain

    from epiflow.train import metrics as M

    marks = []  # process CPU time and wall time at the end of every step
    log_row = M.MetricsLogger.log

    def log_and_mark(self, row):
        marks.append((time.process_time(), time.time()))
        log_row(self, row)

    M.MetricsLogger.log = log_and_mark
    out = Path(args.workdir) / f"run_{os.getpid()}"
    pretrain(args.corpus, out, PretrainConfig(
        model_config="tiny", epochs=1, max_steps=args.steps, rlm_epochs=1, batch_tokens=4096, lr=1e-3,
        ckpt_every=0, eval_fraction=0.0, progress=False, device="cpu"))
    m = pd.read_csv(out / "metrics.csv")
    st = m["step_s"].iloc[2:] if len(m) > 4 else m["step_s"]
    (c0, w0), (c1, w1) = marks[min(2, len(marks) - 2)], marks[-1]
    n = len(marks) - 1 - min(2, len(marks) - 2)
    print(json.dumps({"step_s_median": float(st.median()), "step_s_mean": float(st.mean()),
                      "cpu_s_per_step": (c1 - c0) / n, "cpu_over_wall": (c1 - c0) / (w1 - w0),
                      "steps": int(len(m)),
                      "torch_threads": torch.get_num_threads(),
                      "interop_threads": torch.get_num_interop_threads(),
                      "wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


def _burner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="12 steps, 2 repeats")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--burners", type=int, default=1, help="competing processes (one core each)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset")
    ap.add_argument("--corpus", default=None, help="a corpus folder (default: a demo-sized toy corpus)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run before it is reported as timed out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    if args.quick:
        args.steps, args.repeats = 12, 2
    names = [s for s in args.settings.split(",") if s]
    unknown = set(names) - set(SETTINGS)
    if unknown:
        ap.error(f"unknown settings {sorted(unknown)}; choose from {list(SETTINGS)}")
    runs = []
    with tempfile.TemporaryDirectory() as wd:
        corpus = args.corpus
        if corpus is None:
            from epiflow.train.toy import write_toy_corpus

            corpus = str(write_toy_corpus(Path(wd) / "corpus", n_cells=600, n_ccres=4930, n_types=4, seed=0,
                                          shard_size=300, p_in=0.2, p_out=0.01, p_common=0.3, frac_common=0.02))
        base = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
        for rep in range(args.repeats):
            for load in ("idle", "loaded"):
                burners = [_burner() for _ in range(args.burners)] if load == "loaded" else []
                try:
                    if burners:
                        time.sleep(1.0)
                    for name in names:
                        env = {**base, **SETTINGS[name]}
                        cmd = [sys.executable, __file__, "--child", "--workdir", wd, "--corpus", corpus,
                               "--steps", str(args.steps)] + (["--policy"] if name == "epiflow" else [])
                        load1 = os.getloadavg()[0]
                        t0 = time.time()
                        try:
                            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                            row = (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0
                                   else {"error": r.stderr[-1500:]})
                        except subprocess.TimeoutExpired:
                            row = {"error": f"timed out after {args.timeout} s"}
                        runs.append({"repeat": rep, "load": load, "setting": name, "loadavg_1min_before": load1,
                                     "process_wall_s": round(time.time() - t0, 1), **row})
                        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                finally:
                    for b in burners:
                        b.kill()
                        b.wait()
    summary = {}
    for load in ("idle", "loaded"):
        for name in names:
            rows = [r for r in runs if r["load"] == load and r["setting"] == name and "error" not in r]
            timeouts = sum(1 for r in runs if r["load"] == load and r["setting"] == name
                           and "timed out" in r.get("error", ""))
            if timeouts:  # a run that timed out took more than timeout / steps seconds per step
                summary.setdefault(load, {})[name] = {"timed_out_runs": timeouts,
                                                      "step_s_at_least": round(args.timeout / args.steps, 1)}
            if not rows:
                continue
            vals = sorted(r["step_s_median"] for r in rows)
            cpus = sorted(r["cpu_s_per_step"] for r in rows)
            summary.setdefault(load, {}).setdefault(name, {}).update({
                "step_s": round(vals[len(vals) // 2], 3), "step_s_range": [round(vals[0], 3), round(vals[-1], 3)],
                "cpu_s_per_step": round(cpus[len(cpus) // 2], 3), "runs": len(rows)})
    print(json.dumps({"steps": args.steps, "repeats": args.repeats, "burners": args.burners,
                      "cpus": len(os.sched_getaffinity(0)), "summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
