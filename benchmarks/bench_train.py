"""Pretraining memory and throughput: dense fp32 AdamW versus the memory-lean mode.

Prints one JSON object, dense and lean side by side:

* ``paper_estimate``: analytic bytes per GPU of the training state (parameters, gradients,
  optimiser states, the lean mode's per-step records and chunk workspace) of the ``paper`` config
  (1,355,445 cCREs, 18 x 512; 8 GPUs x 4 cells x accumulation 4, every cell 8,190 tokens) from
  :func:`epiflow.train.lean.memory_estimate`, in RLM epochs (the replaced copy doubles the input
  sentences: worst case) and after them; plus a rough activation figure (not part of the target).
* ``scaled``: a reduced-scale run of ``epiflow.train.pretrain`` per mode, each in its own
  subprocess (CPU: peak RSS ``VmHWM`` over the RSS after imports; CUDA: ``max_memory_allocated``),
  with the exact tensor bytes of the training state, the lean records' peak, tokens/s, and the
  analytic estimate for the same shapes.
* ``side_by_side``: the headline rows of both.

    python benchmarks/bench_train.py --quick           # CPU, 50,000 cCREs x 64, 3 steps per mode
    python benchmarks/bench_train.py                   # CPU, 300,000 cCREs x 128, 4 steps per mode
    python benchmarks/bench_train.py --device cuda --paper   # GPU: paper sizes (1,355,445 x 512, 18 layers)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 1e9
MB = 2**20


def _gb(d: dict) -> dict:
    return {k: round(v / GB, 3) for k, v in d.items()}


def paper_estimate() -> dict:
    from epiflow.model import EpiAgentConfig
    from epiflow.train.lean import memory_estimate

    cfg = EpiAgentConfig.preset("paper")
    rlm = memory_estimate(cfg, rlm=True)
    no_rlm = memory_estimate(cfg, rlm=False)
    mom = memory_estimate(cfg, rlm=True, momentum=True)
    dense = rlm["dense"]["total"]
    # activations per layer and token in bf16 (qkv, attention out, 2 residual inputs, 2 LN, FFN in
    # and GELU out, dropout masks), flash attention (no L^2 scores); 4 cells x 8,192 tokens;
    per_tok_layer = 2 * (3 * cfg.dim + cfg.dim + 4 * cfg.dim + 2 * cfg.ffn) + 3 * cfg.dim
    act = 4 * 8192 * cfg.num_layers * per_tok_layer
    # CCA head on every query of the micro-batch (4 cells x 20,000 x (1 + K = 6)): input, hidden,
    # LayerNorm and their gradients, bf16
    act += 4 * 20_000 * 6 * (2 * cfg.dim + 3 * cfg.cca_hidden) * 2
    return {
        "config": {"n_ccres": cfg.n_ccres, "dim": cfg.dim, "layers": cfg.num_layers, "parameters": rlm["parameters"],
                   "table_parameters": rlm["table_parameters"], "other_parameters": rlm["other_parameters"],
                   **rlm["inputs"]},
        "dense_fp32_adamw_gb": _gb(rlm["dense"]),
        "lean_gb_rlm_epochs": _gb(rlm["lean"]),
        "lean_gb_after_rlm": _gb(no_rlm["lean"]),
        "lean_with_bf16_momentum_gb_total": round(mom["lean"]["total"] / GB, 3),
        "target_one_third_gb": round(dense / 3 / GB, 3),
        "lean_over_dense": round(rlm["lean"]["total"] / dense, 3),
        "meets_target": bool(rlm["lean"]["total"] <= dense / 3),
        "activations_bf16_gb_rough": round(act / GB, 2),
        "notes": "per GPU, state only (weights, gradients, optimiser, lean records and chunk workspace); "
                 "worst case: every cell 8,190 tokens, all tokens of a micro-batch distinct rows, 20,000 "
                 "accessible cCREs per cell, K = 5; activations are a rough bf16 figure, not in the target",
    }


def _proc_status_mb(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process in MiB, from /proc (Linux). Unlike
    ``ru_maxrss`` these belong to the process's own address space, not inherited from the parent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(args) -> None:
    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    from epiflow.train import PretrainConfig, pretrain

    lean = args.child == "lean"
    out = Path(args.workdir) / f"run_{args.child}"
    dev = args.device
    overrides = {"num_layers": args.layers, "dim": args.dim, "num_heads": max(1, args.dim // 64),
                 "ffn": 4 * args.dim, "max_rank": args.max_len + 2}
    rss0 = _proc_status_mb("VmRSS")
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    s = pretrain(args.workdir + "/corpus", out, PretrainConfig(
        model_config="tiny", model_overrides=overrides, epochs=1, max_steps=args.steps, rlm_epochs=1,
        batch_tokens=args.batch_tokens, max_len=args.max_len, lr=1e-4, ckpt_every=0, eval_fraction=0.02,
        memory_lean=lean, progress=False, device=dev, lean_chunk=args.chunk, k_schedule=(args.k,)))
    st = torch.load(out / "train_state.pt", weights_only=False, map_location="cpu")

    def nbytes(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size() if x.numel() > 1 else 0  # skip step counters
        if isinstance(x, dict):
            return sum(nbytes(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(nbytes(v) for v in x)
        return 0

    params = sum(v.numel() * v.element_size() for k, v in st["model"].items() if not k.startswith("criterion"))
    tables = sum(st["model"][k].numel() * 4 for k in ("cCRE_embedding.weight", "signal_decoder.weight"))
    opt_bytes = nbytes(st["optimizer"]["state"]) + nbytes(st["lean"] or {})
    grads = params if not lean else params - tables  # dense grads (lean: only non-table params)
    records = (s.get("lean_peak_store_mb") or 0.0) * MB
    peak = (torch.cuda.max_memory_allocated() / MB if dev.startswith("cuda")
            else _proc_status_mb("VmHWM"))
    m = pd.read_csv(out / "metrics.csv")
    tps = m["tokens_per_s"].iloc[1:] if len(m) > 1 else m["tokens_per_s"]
    print(json.dumps({"mode": args.child, "params_mb": params / MB, "optimizer_state_mb": opt_bytes / MB,
                      "dense_grads_mb": grads / MB, "lean_records_peak_mb": records / MB,
                      "state_total_mb": (params + opt_bytes + grads + records) / MB,
                      "peak_mb": peak, "rss_after_imports_mb": rss0,
                      "peak_over_start_mb": peak - (0.0 if dev.startswith("cuda") else rss0),
                      "wall_s": s["wall_s"], "steps": s["steps"],
                      "tokens_per_s_median_after_first": float(tps.median()),
                      "tokens_total": int(m["tokens"].sum()), "loss_first": float(m["loss"].iloc[0]),
                      "loss_last": float(m["loss"].iloc[-1])}))


def _scaled_estimate(args, corpus: Path) -> dict:
    """memory_estimate for the scaled run's shapes: the largest micro-batch of its plan, its longest
    sentence and cell, K and chunk (an upper bound of the lean records)."""
    import numpy as np

    from epiflow.model import EpiAgentConfig
    from epiflow.train.data import PlanConfig, build_index, epoch_plan, split_cells
    from epiflow.train.lean import memory_estimate

    index = build_index(corpus)
    train, _ = split_cells(index.n_cells, 0.02, 0, 2000)
    plan = epoch_plan(index, train, 0, PlanConfig(batch_tokens=args.batch_tokens, max_len=args.max_len))
    cells = max(len(mb) for mb in plan[:args.steps])
    longest = int(min(np.max(index.lengths), args.max_len))
    cfg = EpiAgentConfig.preset("tiny", n_ccres=index.n_ccres, num_layers=args.layers, dim=args.dim,
                                num_heads=max(1, args.dim // 64), ffn=4 * args.dim, max_rank=args.max_len + 2)
    e = memory_estimate(cfg, cells_per_gpu=cells, grad_accum=1, gpus=1, seq=longest, rlm=True,
                        positives_per_cell=int(np.max(index.lengths)), k=args.k, chunk=args.chunk)
    return {"dense_mb": {k: round(v / MB, 1) for k, v in e["dense"].items()},
            "lean_mb": {k: round(v / MB, 1) for k, v in e["lean"].items()},
            "inputs": e["inputs"], "parameters": e["parameters"],
            "mean_sentence_length": float(np.mean(index.lengths))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--paper", action="store_true", help="paper sizes (GPU): 1,355,445 cCREs, 18 x 512, 8,190 tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-ccres", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--cells", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--max-len", type=int, default=254, help="tokens per sentence (short: small activations)")
    ap.add_argument("--k", type=int, default=2, help="CCA negatives per positive")
    ap.add_argument("--chunk", type=int, default=16384, help="lean: rows per chunk")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paper:
        args.n_ccres, args.dim, args.layers, args.max_len = 1_355_445, 512, 18, 8190
        args.batch_tokens = max(args.batch_tokens, 32768)
    if args.n_ccres is None:
        args.n_ccres = 50_000 if args.quick else 300_000
    if args.dim is None:
        args.dim = 64 if args.quick else 128
    if args.steps is None:
        args.steps = 3 if args.quick else 4
    if args.cells is None:
        args.cells = 200 if args.quick else 120
    if args.child:
        _child(args)
        return
    result = {"paper_estimate": paper_estimate()}
    with tempfile.TemporaryDirectory() as wd:
        from epiflow.train.toy import write_toy_corpus

        # sparse structured counts: ~1-2 % of cCREs accessible per cell (capped at --max-len tokens)
        corpus = write_toy_corpus(Path(wd) / "corpus", n_cells=args.cells, n_ccres=args.n_ccres, n_types=4,
                                  seed=0, shard_size=100, p_in=0.01, p_out=0.001, p_common=0.02, frac_common=0.05)
        scaled_est = _scaled_estimate(args, corpus)
        # freed large blocks go back to the OS at once (glibc's dynamic mmap threshold would keep them
        # in the heap), so the peak RSS follows the live tensors more closely; same for both modes
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="131072")
        measured = {}
        for mode in ("dense", "lean"):
            cmd = [sys.executable, __file__, "--child", mode, "--workdir", wd, "--device", args.device,
                   "--n-ccres", str(args.n_ccres), "--dim", str(args.dim), "--layers", str(args.layers),
                   "--steps", str(args.steps), "--batch-tokens", str(args.batch_tokens),
                   "--max-len", str(args.max_len), "--threads", str(args.threads), "--k", str(args.k),
                   "--chunk", str(args.chunk)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                measured[mode] = {"error": r.stderr[-2000:]}
                continue
            measured[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    ok = all("error" not in measured.get(m, {"error": 1}) for m in ("dense", "lean"))
    result["scaled"] = {"device": args.device, "n_ccres": args.n_ccres, "dim": args.dim, "layers": args.layers,
                        "cells": args.cells, "steps": args.steps, "batch_tokens": args.batch_tokens,
                        "max_len": args.max_len, "threads": args.threads, "estimate": scaled_est, **measured}
    pe = result["paper_estimate"]
    side = {"paper_estimate_state_gb": {"dense": pe["dense_fp32_adamw_gb"]["total"],
                                        "lean": pe["lean_gb_rlm_epochs"]["total"],
                                        "lean_after_rlm": pe["lean_gb_after_rlm"]["total"],
                                        "target": pe["target_one_third_gb"]},
            "scaled_estimate_state_mb": {"dense": scaled_est["dense_mb"]["total"],
                                         "lean": scaled_est["lean_mb"]["total"]}}
    if ok:
        d, l_ = measured["dense"], measured["lean"]
        side["scaled_measured_state_mb"] = {"dense": round(d["state_total_mb"], 1), "lean": round(l_["state_total_mb"], 1)}
        side["scaled_measured_peak_mb"] = {"dense": round(d["peak_over_start_mb"], 1),
                                           "lean": round(l_["peak_over_start_mb"], 1),
                                           "what": "max_memory_allocated" if args.device.startswith("cuda")
                                           else "peak RSS over RSS after imports"}
        side["scaled_tokens_per_s"] = {"dense": round(d["tokens_per_s_median_after_first"]),
                                       "lean": round(l_["tokens_per_s_median_after_first"])}
        side["scaled_ratios_lean_over_dense"] = {
            "state": round(l_["state_total_mb"] / d["state_total_mb"], 3),
            "peak": round(l_["peak_over_start_mb"] / d["peak_over_start_mb"], 3),
            "tokens_per_s": round(l_["tokens_per_s_median_after_first"] / d["tokens_per_s_median_after_first"], 3)}
    result["side_by_side"] = side
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
