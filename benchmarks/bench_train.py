"""Pretraining memory and throughput: dense fp32 AdamW versus the memory-lean mode, with and without
activation checkpointing.

Prints one JSON object, the modes side by side (``--modes``, default ``dense,lean``; a mode with
``+ckpt``, e.g. ``lean+ckpt``, turns on activation checkpointing per encoder block;
``--checkpointing`` adds ``lean+ckpt`` to the list):

* ``paper_estimate``: analytic bytes per GPU of the training state (parameters, gradients,
  optimiser states, the lean mode's per-step records and chunk workspace) of the ``paper`` config
  (1,355,445 cCREs, 18 x 512; 8 GPUs x 4 cells x accumulation 4, every cell 8,190 tokens) from
  :func:`epiflow.train.lean.memory_estimate`, in RLM epochs (the replaced copy doubles the input
  sentences: worst case) and after them; plus the encoder activations kept for the backward pass
  (:func:`epiflow.train.lean.activation_estimate`, bf16, 4 cells x 8,192 tokens and their RLM
  copies), with and without checkpointing, and the expected lean peak (state + activations).
* ``scaled``: a reduced-scale run of ``epiflow.train.pretrain`` per mode, each in its own
  subprocess (CPU: peak RSS ``VmHWM`` over the RSS after imports; CUDA: ``max_memory_allocated``),
  with the exact tensor bytes of the training state (of the state dicts pretraining would save at the
  end, measured in memory: nothing is written), the lean records' peak, tokens/s, and the
  analytic estimate for the same shapes (state, activations, expected peak per mode).
* ``side_by_side``: the headline rows of every mode.

``--speed`` (issue #15) measures instead the throughput of a full pretraining step (CCA + SR + RLM,
AdamW included; ``epiflow.train.pretrain`` on a demo-sized corpus, ~4,900 cCREs, ~300 accessible per
cell, 4,096 padded tokens per step) for the ``tiny`` and ``small`` presets, each in its own process
on ``--threads`` threads under epiflow's thread policy, next to the machine's fp32 matmul rate on the
same threads (median of 1,024^3 ``torch.mm`` products, measured before and after the run): tokens/s,
the model FLOPs per step (analytic: encoder linears and attention, twice in RLM epochs, signal
decoder, CCA and RLM heads, x3 for forward + backward) and the achieved share of the matmul rate,
both per wall second and per process CPU second (the latter holds on a shared machine: other
processes lengthen the wall time of both the step and the matmul, not their CPU time, as long as
no thread spins).

    python benchmarks/bench_train.py --speed --threads 1    # tiny and small, 20 steps each
    python benchmarks/bench_train.py --speed --configs small --steps 4 --repeats 1 --profile
    python benchmarks/bench_train.py --quick           # CPU, 50,000 cCREs x 64, 3 steps per mode
    python benchmarks/bench_train.py                   # CPU, 300,000 cCREs x 128, 4 steps per mode
    python benchmarks/bench_train.py --device cuda --paper   # GPU: paper sizes (1,355,445 x 512, 18 layers)
    python benchmarks/bench_train.py --quick --checkpointing   # dense, lean and lean+ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 1e9
MB = 2**20
MODES = ("dense", "lean", "dense+ckpt", "lean+ckpt")


def _gb(d: dict) -> dict:
    return {k: round(v / GB, 3) for k, v in d.items()}


def paper_estimate() -> dict:
    from epiflow.model import EpiAgentConfig
    from epiflow.train.lean import activation_estimate, memory_estimate

    cfg = EpiAgentConfig.preset("paper")
    rlm = memory_estimate(cfg, rlm=True)
    no_rlm = memory_estimate(cfg, rlm=False)
    mom = memory_estimate(cfg, rlm=True, momentum=True)
    dense = rlm["dense"]["total"]
    # encoder activations kept for backward (bf16 autocast, CUDA): 4 cells x 8,192 tokens and their
    # RLM copies in one forward, with and without activation checkpointing
    tokens = 2 * 4 * 8192
    enc = activation_estimate(cfg, tokens)["peak_in_backward"]
    enc_ck = activation_estimate(cfg, tokens, checkpointing=True)["peak_in_backward"]
    # CCA head on every query of the micro-batch (4 cells x 20,000 x (1 + K = 6)): input, hidden,
    # LayerNorm and their gradients, bf16 (rough)
    cca = 4 * 20_000 * 6 * (2 * cfg.dim + 3 * cfg.cca_hidden) * 2
    lean_state = rlm["lean"]["total"]
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
        "activations_gb": {"tokens_per_micro_batch": tokens, "encoder": round(enc / GB, 2),
                           "encoder_checkpointed": round(enc_ck / GB, 2), "cca_head_rough": round(cca / GB, 2)},
        "expected_lean_peak_gb": {"lean": round((lean_state + enc + cca) / GB, 2),
                                  "lean+ckpt": round((lean_state + enc_ck + cca) / GB, 2),
                                  "what": "analytic lean state (RLM epochs) + encoder activations + CCA head; "
                                          "leaves out embeddings, other heads, gradients in flight, allocator slack"},
        "notes": "per GPU; the state (weights, gradients, optimiser, lean records and chunk workspace) in the "
                 "worst case: every cell 8,190 tokens, all tokens of a micro-batch distinct rows, 20,000 "
                 "accessible cCREs per cell, K = 5; activations (epiflow.train.lean.activation_estimate) are "
                 "not in the 1/3 target",
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


def _nbytes(x) -> int:
    """Bytes of the tensors in a (nested) state dict; 0-d / one-element tensors (step counters) not counted."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size() if x.numel() > 1 else 0
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


def _child(args) -> None:
    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    from epiflow.train.pretrain import PretrainConfig, pretrain

    lean, ckpt = args.child.split("+")[0] == "lean", args.child.endswith("+ckpt")
    out = Path(args.workdir) / f"run_{args.child.replace('+', '_')}"
    dev = args.device
    overrides = {"num_layers": args.layers, "dim": args.dim, "num_heads": max(1, args.dim // 64),
                 "ffn": 4 * args.dim, "max_rank": args.max_len + 2}
    rss0 = _proc_status_mb("VmRSS")
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # The training state is measured from the live state dicts where pretraining saves it at the end (the
    # same dicts it writes), and nothing is written: the paper state is ~23 GB dense and ~12 GB lean with
    # the checkpoint, which took ~2.5 min of the GPU check's time on disk and half the RAM in /dev/shm.
    import epiflow.train.pretrain as P

    measured: dict = {}

    def measure_state(out_dir, cfg, model, opt, sched, lean_opt, step, info, index) -> None:
        measured.update(model={k: v.numel() * v.element_size() for k, v in model.state_dict().items()},
                        optimizer=_nbytes(opt.state_dict()["state"]),
                        lean=_nbytes(lean_opt.state_dict() if lean_opt is not None else {}), step=int(step))

    P._save_all = measure_state
    s = pretrain(args.workdir + "/corpus", out, PretrainConfig(
        model_config="tiny", model_overrides=overrides, epochs=1, max_steps=args.steps, rlm_epochs=1,
        batch_tokens=args.batch_tokens, max_len=args.max_len, lr=1e-4, ckpt_every=0, eval_fraction=0.02,
        memory_lean=lean, progress=False, device=dev, lean_chunk=args.chunk, k_schedule=(args.k,),
        gradient_checkpointing=ckpt, grad_accum=args.grad_accum, rlm_separate=args.rlm_separate))
    if measured.get("step") != s["steps"]:
        raise RuntimeError(f"the training state was not measured at the end of the run ({measured.get('step')} "
                           f"!= {s['steps']} steps): epiflow.train.pretrain._save_all changed")
    params = sum(v for k, v in measured["model"].items() if not k.startswith("criterion"))
    tables = sum(measured["model"][k] for k in ("cCRE_embedding.weight", "signal_decoder.weight"))
    opt_bytes = measured["optimizer"] + measured["lean"]
    grads = params if not lean else params - tables  # dense grads (lean: only non-table params)
    records = (s.get("lean_peak_store_mb") or 0.0) * MB
    peak = (torch.cuda.max_memory_allocated() / MB if dev.startswith("cuda")
            else _proc_status_mb("VmHWM"))
    m = pd.read_csv(out / "metrics.csv")
    tps = m["tokens_per_s"].iloc[1:] if len(m) > 1 else m["tokens_per_s"]
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"mode": args.child, "checkpointing": ckpt, "params_mb": params / MB, "optimizer_state_mb": opt_bytes / MB,
                      "dense_grads_mb": grads / MB, "lean_records_peak_mb": records / MB,
                      "state_total_mb": (params + opt_bytes + grads + records) / MB,
                      "peak_mb": peak, "rss_after_imports_mb": rss0,
                      "peak_over_start_mb": peak - (0.0 if dev.startswith("cuda") else rss0),
                      "wall_s": s["wall_s"], "steps": s["steps"],
                      "tokens_per_s_median_after_first": float(tps.median()),
                      "tokens_total": int(m["tokens"].sum()), "loss_first": float(m["loss"].iloc[0]),
                      "loss_last": float(m["loss"].iloc[-1])}))


def matmul_gflops(n: int = 1024, reps: int = 7) -> dict:
    """fp32 ``torch.mm`` rate of this process's threads, n x n x n products: median over ``reps`` of
    wall time and of process CPU time (the CPU-time rate does not depend on how many other
    processes share the cores, as long as no thread spins: per core, multiply by the threads)."""
    import time

    import numpy as np
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    flop = 2.0 * n ** 3
    return {"wall": flop / float(np.median(wall)) / 1e9, "cpu": flop / max(float(np.median(cpu)), 1e-9) / 1e9}


def step_flops(cfg, lengths, n_queries: int, rlm: bool) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward) of cells whose input
    sentences (with [CLS]/[SEP]) have ``lengths``: encoder linears and attention scores (twice with
    the RLM copy), RLM head on every cCRE token of the copy, CCA head on ``n_queries`` queries,
    signal decoder over all cCREs per cell. Embedding lookups, norms and the optimiser are left out."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.float64)
    D, F_, Lyr = cfg.dim, cfg.ffn, cfg.num_layers
    passes = 2 if rlm else 1
    linear = lengths.sum() * Lyr * 2 * (4 * D * D + 2 * D * F_)
    attn = Lyr * (4 * lengths ** 2 * D).sum()
    sr = len(lengths) * 2 * D * cfg.n_ccres
    cca = n_queries * 2 * (2 * D * cfg.cca_hidden + cfg.cca_hidden)
    rlm_head = (lengths - 2).sum() * 2 * (D * cfg.rlm_hidden + cfg.rlm_hidden) if rlm else 0.0
    return 3.0 * (passes * (linear + attn) + sr + cca + rlm_head)


def _speed_child(args) -> None:
    from epiflow import threads

    threads.configure_env()
    threads.apply(args.threads)
    import time

    import numpy as np
    import pandas as pd
    import torch

    threads.apply(args.threads)
    from epiflow.train.pretrain import PretrainConfig, pretrain
    from epiflow.model import from_config
    from epiflow.train.data import BatchConfig, PlanConfig, ShardCache, build_index, epoch_plan, make_batch, split_cells
    from epiflow.train.pretrain import build_model_config

    mm_before = matmul_gflops()
    from epiflow.train import metrics as M

    marks = []  # process CPU time at the end of every step
    log_row = M.MetricsLogger.log

    def log_and_mark(self, row):
        marks.append(time.process_time())
        log_row(self, row)

    M.MetricsLogger.log = log_and_mark
    out = Path(args.workdir) / f"speed_{args.child_config}"
    pcfg = PretrainConfig(model_config=args.child_config, epochs=1, max_steps=args.steps, rlm_epochs=1,
                          batch_tokens=args.batch_tokens, max_len=args.max_len, lr=1e-4, ckpt_every=0,
                          eval_fraction=0.0, progress=False, device="cpu", k_schedule=(args.k,))
    t0 = time.perf_counter()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            s = pretrain(args.workdir + "/corpus", out, pcfg)
        ka = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ka)
        top = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:25]
        profile_rows = [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 4),
                         "calls": e.count} for e in top]
    else:
        s = pretrain(args.workdir + "/corpus", out, pcfg)
        profile_rows = None
    wall = time.perf_counter() - t0
    mm_after = matmul_gflops()
    # FLOPs of the same steps: the plan and batches are a pure function of (seed, epoch, step)
    index = build_index(args.workdir + "/corpus")
    train, _ = split_cells(index.n_cells, 0.0, 0, 2000)
    plan = epoch_plan(index, train, 0, PlanConfig(batch_tokens=args.batch_tokens, max_len=args.max_len))
    cache = ShardCache(index, 3)
    bcfg = BatchConfig(n_ccres=index.n_ccres, max_len=args.max_len, k=args.k, rlm=True, seed=0)
    mcfg = build_model_config(args.child_config, index.n_ccres)
    flops = []
    for mb in plan[:s["steps"]]:
        b = make_batch(cache, mb, 0, bcfg)
        lens = (b["input_ids"] != 0).sum(1).numpy()
        flops.append(step_flops(mcfg, lens, len(b["cca_ids"]), rlm=True))
    m = pd.read_csv(out / "metrics.csv")
    skip = 2 if len(m) > 4 else 0
    steps_timed = slice(skip, len(m))
    tok = m["tokens"].to_numpy()[steps_timed]
    fl = np.asarray(flops)[steps_timed]
    t = float(np.sum(m["step_s"].to_numpy()[steps_timed]))
    cpu = float(marks[-1] - marks[skip - 1]) if skip else None  # CPU seconds of the timed steps
    mm = max(mm_before["wall"], mm_after["wall"])
    mm_cpu = max(mm_before["cpu"], mm_after["cpu"]) / torch.get_num_threads()
    print(json.dumps({
        "config": args.child_config, "threads": torch.get_num_threads(), "steps": int(len(m)),
        "steps_timed": int(len(tok)), "parameters": int(sum(p.numel() for p in from_config(mcfg).parameters())),
        "tokens_per_step": float(tok.mean()), "step_s_median": float(np.median(m["step_s"].to_numpy()[steps_timed])),
        "tokens_per_s": float(tok.sum() / t), "gflop_per_step": float(fl.mean() / 1e9),
        "achieved_gflops": float(fl.sum() / t / 1e9), "matmul_gflops_before": mm_before["wall"],
        "matmul_gflops_after": mm_after["wall"], "share_of_matmul": float(fl.sum() / t / 1e9 / mm),
        "cpu_s_per_step": None if cpu is None else cpu / len(tok),
        "achieved_gflop_per_cpu_s": None if cpu is None else float(fl.sum() / cpu / 1e9),
        "matmul_gflop_per_cpu_s_per_thread": mm_cpu,
        "share_of_matmul_cpu_time": None if cpu is None else float(fl.sum() / cpu / 1e9 / mm_cpu),
        "wall_s_incl_setup": wall, **({"profile_top_self_cpu": profile_rows} if profile_rows else {})}))


def speed(args) -> dict:
    """Full pretraining step throughput of tiny and small next to the fp32 matmul rate."""
    import time

    from epiflow.train.toy import write_toy_corpus

    rows = {}
    with tempfile.TemporaryDirectory() as wd:
        write_toy_corpus(Path(wd) / "corpus", n_cells=600, n_ccres=4930, n_types=4, seed=0, shard_size=300,
                         p_in=0.2, p_out=0.01, p_common=0.3, frac_common=0.02)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        for rep in range(args.repeats):
            for name in args.configs.split(","):
                cmd = [sys.executable, __file__, "--child", "speed", "--child-config", name, "--workdir", wd,
                       "--steps", str(args.steps), "--batch-tokens", str(args.batch_tokens),
                       "--max-len", str(args.max_len), "--k", str(args.k), "--threads", str(args.threads)]
                cmd += ["--profile"] if args.profile else []
                load = os.getloadavg()[0]
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                row = (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0
                       else {"config": name, "error": r.stderr[-2000:]})
                row["loadavg_1min_before"] = round(load, 2)
                row["at"] = time.strftime("%H:%M:%S")
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.setdefault(name, []).append(row)
    best = {}
    for name, rs in rows.items():
        ok = [r for r in rs if "error" not in r]
        if ok:
            r = max(ok, key=lambda r: r["tokens_per_s"])
            best[name] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                          if k in ("tokens_per_s", "achieved_gflops", "matmul_gflops_before", "matmul_gflops_after",
                                   "share_of_matmul", "gflop_per_step", "tokens_per_step", "step_s_median",
                                   "cpu_s_per_step", "achieved_gflop_per_cpu_s",
                                   "matmul_gflop_per_cpu_s_per_thread", "share_of_matmul_cpu_time",
                                   "parameters", "loadavg_1min_before")}
    return {"threads": args.threads, "steps": args.steps, "batch_tokens": args.batch_tokens, "k": args.k,
            "best_of_repeats": best, "runs": rows,
            "target": "small: share_of_matmul >= 0.25"}


def _scaled_estimate(args, corpus: Path, modes) -> dict:
    """memory_estimate for the scaled run's shapes: the largest micro-batch of its plan, its longest
    sentence and cell, K and chunk (an upper bound of the lean records); activation_estimate for the
    micro-batch with the most tokens (with its RLM copies), and their sum per mode."""
    import numpy as np

    from epiflow.model import EpiAgentConfig
    from epiflow.train.data import PlanConfig, build_index, epoch_plan, split_cells
    from epiflow.train.lean import activation_estimate, default_chunks, memory_estimate

    index = build_index(corpus)
    train, _ = split_cells(index.n_cells, 0.02, 0, 2000)
    plan = epoch_plan(index, train, 0, PlanConfig(batch_tokens=args.batch_tokens, max_len=args.max_len))
    micro = plan[:args.steps * args.grad_accum]  # the micro-batches of the measured steps
    cells = max(len(mb) for mb in micro)
    longest = int(min(np.max(index.lengths), args.max_len))
    cfg = EpiAgentConfig.preset("tiny", n_ccres=index.n_ccres, num_layers=args.layers, dim=args.dim,
                                num_heads=max(1, args.dim // 64), ffn=4 * args.dim, max_rank=args.max_len + 2)
    auto_chunk, query_chunk = default_chunks(args.device)
    e = memory_estimate(cfg, cells_per_gpu=cells, grad_accum=args.grad_accum, gpus=1, seq=longest, rlm=True,
                        positives_per_cell=int(np.max(index.lengths)), k=args.k, chunk=args.chunk or auto_chunk,
                        query_chunk=query_chunk)
    # packed tokens of one forward: [CLS] sentence [SEP] per cell, twice (the RLM copy) unless the copies
    # have a forward of their own (--rlm-separate)
    tokens = max((1 if args.rlm_separate else 2) * int(np.sum(np.minimum(index.lengths[np.asarray(mb, dtype=np.int64)], args.max_len) + 2))
                 for mb in micro)
    cuda = args.device.startswith("cuda")  # precision auto: bf16 autocast on CUDA, fp32 on CPU
    act = {ck: activation_estimate(cfg, tokens, checkpointing=ck, bf16=cuda, device=args.device)["peak_in_backward"]
           for ck in (False, True)}
    expected = {m: round((e[m.split("+")[0]]["total"] + act[m.endswith("+ckpt")]) / MB, 1) for m in modes}
    return {"dense_mb": {k: round(v / MB, 1) for k, v in e["dense"].items()},
            "lean_mb": {k: round(v / MB, 1) for k, v in e["lean"].items()},
            "encoder_activations_mb": {"no_ckpt": round(act[False] / MB, 1), "ckpt": round(act[True] / MB, 1),
                                       "tokens_per_micro_batch": tokens},
            "expected_peak_mb": expected,
            "expected_peak_is": "state + encoder activations kept for backward (no heads, embeddings, gradients "
                                "in flight, allocator slack" + ("" if cuda else "; on CPU attention dropout runs "
                                "SDPA's math kernel, whose L x L tensors are left out, and the RSS also holds the "
                                "corpus cache") + ")",
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
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="tokens per micro-batch (default 4,096; 32,768 with --paper)")
    ap.add_argument("--max-len", type=int, default=254, help="tokens per sentence (short: small activations)")
    ap.add_argument("--k", type=int, default=2, help="CCA negatives per positive")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    ap.add_argument("--rlm-separate", action="store_true", help="the RLM copies in a forward and backward of "
                    "their own (half the tokens in the encoder at a time)")
    ap.add_argument("--chunk", type=int, default=0, help="lean: rows per chunk (0: the device's default, "
                    "epiflow.train.lean.CHUNKS)")
    ap.add_argument("--modes", default="dense,lean", help=f"comma list of {', '.join(MODES)} (+ckpt: activation "
                    "checkpointing per encoder block); each runs in its own subprocess")
    ap.add_argument("--checkpointing", action="store_true", help="add lean+ckpt to --modes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed", action="store_true", help="tokens/s and FLOP rate of tiny and small (issue #15)")
    ap.add_argument("--configs", default="tiny,small", help="--speed: model presets")
    ap.add_argument("--repeats", type=int, default=2, help="--speed: runs per preset (best is reported)")
    ap.add_argument("--profile", action="store_true", help="--speed: torch.profiler self-CPU shares of the run")
    ap.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batch_tokens is None:
        args.batch_tokens = 32768 if args.paper else 4096
    if args.speed or args.child == "speed":
        args.steps = 20 if args.steps is None else args.steps
        if "--max-len" not in sys.argv:
            args.max_len = 1022
        if args.child:
            _speed_child(args)
        else:
            print(json.dumps(speed(args), indent=1))
        return
    if args.paper:
        args.n_ccres, args.dim, args.layers, args.max_len = 1_355_445, 512, 18, 8190
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
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.checkpointing and "lean+ckpt" not in modes:
        modes.append("lean+ckpt")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: unknown mode(s) {bad or '(none given)'}; choose from {', '.join(MODES)}")
    result = {"paper_estimate": paper_estimate()}
    with tempfile.TemporaryDirectory() as wd:
        from epiflow.train.toy import write_toy_corpus

        # sparse structured counts: ~1-2 % of cCREs accessible per cell (capped at --max-len tokens)
        corpus = write_toy_corpus(Path(wd) / "corpus", n_cells=args.cells, n_ccres=args.n_ccres, n_types=4,
                                  seed=0, shard_size=100, p_in=0.01, p_out=0.001, p_common=0.02, frac_common=0.05)
        scaled_est = _scaled_estimate(args, corpus, modes)
        # freed large blocks go back to the OS at once (glibc's dynamic mmap threshold would keep them
        # in the heap), so the peak RSS follows the live tensors more closely; same for both modes
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="131072")
        measured = {}
        for mode in modes:
            cmd = [sys.executable, __file__, "--child", mode, "--workdir", wd, "--device", args.device,
                   "--n-ccres", str(args.n_ccres), "--dim", str(args.dim), "--layers", str(args.layers),
                   "--steps", str(args.steps), "--batch-tokens", str(args.batch_tokens),
                   "--max-len", str(args.max_len), "--threads", str(args.threads), "--k", str(args.k),
                   "--chunk", str(args.chunk), "--grad-accum", str(args.grad_accum),
                   *(["--rlm-separate"] if args.rlm_separate else [])]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                measured[mode] = {"error": r.stderr[-2000:]}
                continue
            measured[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    ok = [m for m in modes if "error" not in measured.get(m, {"error": 1})]
    result["scaled"] = {"device": args.device, "modes": modes, "n_ccres": args.n_ccres, "dim": args.dim,
                        "layers": args.layers, "cells": args.cells, "steps": args.steps,
                        "batch_tokens": args.batch_tokens, "max_len": args.max_len, "threads": args.threads,
                        "estimate": scaled_est, **measured}
    pe = result["paper_estimate"]
    side = {"paper_estimate_state_gb": {"dense": pe["dense_fp32_adamw_gb"]["total"],
                                        "lean": pe["lean_gb_rlm_epochs"]["total"],
                                        "lean_after_rlm": pe["lean_gb_after_rlm"]["total"],
                                        "target": pe["target_one_third_gb"]},
            "paper_expected_lean_peak_gb": {k: v for k, v in pe["expected_lean_peak_gb"].items() if k != "what"},
            "scaled_estimate_state_mb": {"dense": scaled_est["dense_mb"]["total"],
                                         "lean": scaled_est["lean_mb"]["total"]},
            "scaled_expected_peak_mb": scaled_est["expected_peak_mb"]}
    if ok:
        side["scaled_measured_state_mb"] = {m: round(measured[m]["state_total_mb"], 1) for m in ok}
        side["scaled_measured_peak_mb"] = {**{m: round(measured[m]["peak_over_start_mb"], 1) for m in ok},
                                           "what": "max_memory_allocated" if args.device.startswith("cuda")
                                           else "peak RSS over RSS after imports"}
        side["scaled_tokens_per_s"] = {m: round(measured[m]["tokens_per_s_median_after_first"]) for m in ok}
    if "dense" in ok:
        d = measured["dense"]
        side["scaled_ratios_over_dense"] = {m: {
            "state": round(measured[m]["state_total_mb"] / d["state_total_mb"], 3),
            "peak": round(measured[m]["peak_over_start_mb"] / d["peak_over_start_mb"], 3),
            "tokens_per_s": round(measured[m]["tokens_per_s_median_after_first"]
                                  / d["tokens_per_s_median_after_first"], 3)} for m in ok if m != "dense"}
    if "lean" in ok and "lean+ckpt" in ok:
        a, b = measured["lean"], measured["lean+ckpt"]
        side["scaled_lean_ckpt_over_lean"] = {
            "peak": round(b["peak_over_start_mb"] / a["peak_over_start_mb"], 3),
            "tokens_per_s": round(b["tokens_per_s_median_after_first"] / a["tokens_per_s_median_after_first"], 3)}
    result["side_by_side"] = side
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
