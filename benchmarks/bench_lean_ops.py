"""Host work of a memory-lean pretraining step: PyTorch operator calls per step, by lean chunk size.

On a GPU every operator call is a dispatch on the host and mostly a kernel launch. Run 3 of the GPU
check (benchmarks/README.md) found the memory-lean step host-bound: the H200 was busy for ~163 ms of
each 747 ms step, and the table passes (a few dozen calls per chunk of rows, four passes a step) made
most of the calls. This benchmark counts them on any device (the counts do not depend on it):
``epiflow.train.pretrain`` with ``--memory-lean`` on a synthetic corpus with the paper's vocabulary
(``epiflow.train.toy.sparse_counts``: ~2,000 accessible cCREs a cell, as the GPU check's
pretrain_cli), ``--batch-tokens 16384``, a 1-layer encoder by default (so that the table passes
dominate), the aten operator calls of steps 3-4 from ``EPIFLOW_PROFILE_STEPS``
(:class:`epiflow.train.metrics.StepProfiler`). One subprocess per chunk size; prints one JSON.

    python benchmarks/bench_lean_ops.py                          # chunks 16384,65536: ~4 min, ~18 GB RAM
    python benchmarks/bench_lean_ops.py --n-ccres 300000 --chunks 4096,16384,65536
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> dict:
    from epiflow.train.pretrain import PretrainConfig, pretrain

    prof = Path(args.workdir) / f"profile_{args.chunk}.txt"
    os.environ.update(EPIFLOW_PROFILE_STEPS="3:4", EPIFLOW_PROFILE_OUT=str(prof))
    t = time.time()
    s = pretrain(Path(args.workdir) / "corpus", Path(args.workdir) / f"run_{args.chunk}", PretrainConfig(
        model_config="paper", model_overrides={"num_layers": args.layers, "dim": args.dim, "ffn": 4 * args.dim,
                                               "num_heads": max(1, args.dim // 64)}, max_steps=4, memory_lean=True,
        lean_chunk=args.chunk, batch_tokens=16384, ckpt_every=0, progress=False, device=args.device))
    head = prof.read_text().splitlines()[0]
    calls, per_step = map(int, re.search(r"aten operator calls: (\d+) \((\d+) per step\)", head).groups())
    return {"chunk": args.chunk, "aten_calls_per_step": per_step, "aten_calls_steps_3_4": calls,
            "wall_s": round(time.time() - t, 1), "last_step_s": round(s["last"]["step_s"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", default="16384,65536", help="lean chunk sizes (rows), comma list")
    ap.add_argument("--n-ccres", type=int, default=1_355_445)
    ap.add_argument("--cells", type=int, default=300)
    ap.add_argument("--layers", type=int, default=1, help="encoder layers (the paper: 18)")
    ap.add_argument("--dim", type=int, default=512, help="model width (the paper: 512)")
    ap.add_argument("--median", type=float, default=2000.0, help="median accessible cCREs a cell (at least 200)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args)))
        return
    from epiflow.train import toy

    chunks = [int(x) for x in args.chunks.split(",") if x.strip()]
    result = {"what": "aten operator calls per memory-lean pretraining step (torch.profiler, steps 3-4)",
              "n_ccres": args.n_ccres, "cells": args.cells, "layers": args.layers, "dim": args.dim,
              "median_accessible": args.median, "device": args.device,
              "batch_tokens": 16384, "runs": []}
    with tempfile.TemporaryDirectory() as wd:
        toy.write_toy_corpus(Path(wd) / "corpus", n_cells=args.cells, n_ccres=args.n_ccres, n_types=8, seed=0,
                             shard_size=100, counts_fn=toy.sparse_counts, median=args.median)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
        for chunk in chunks:
            r = subprocess.run([sys.executable, __file__, "--child", "--chunk", str(chunk), "--workdir", wd,
                                "--layers", str(args.layers), "--dim", str(args.dim), "--device", args.device,
                                "--threads", str(args.threads)],
                               capture_output=True, text=True, env=env)
            result["runs"].append(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0
                                  else {"chunk": chunk, "error": r.stderr[-2000:]})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
