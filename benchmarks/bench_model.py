"""Train-step throughput of the EpiAgent model: padded SDPA vs packed (varlen) attention [vs flash-attn].

One training step = forward + backward of the encoder with the signal decoder (sparse SR loss) and
the RLM head on every cCRE token; no optimizer. Cell lengths are log-normal (median ~2,000 tokens,
capped at 8,190 + [CLS]/[SEP]); the same random cells are used for every variant. On CPU each
variant runs in its own subprocess so that its peak RSS is its own; on CUDA the variants share one
process and one model (peak max-allocated memory reset per variant). A variant is a backend (sdpa,
packed, flash) with optional modifiers: +cudnn, +perseq, +nodrop (see --variants).

    python benchmarks/bench_model.py --quick                 # CPU, small config, short cells, 2 steps
    python benchmarks/bench_model.py                         # CPU, small config, realistic lengths
    python benchmarks/bench_model.py --device cuda --config paper --variants sdpa,packed,packed+perseq,flash
    python benchmarks/bench_model.py --device cuda --median 8190 --sigma 0 --cap 8190 --min-len 8190 \
        --variants packed,packed+nodrop --breakdown          # L = 8,192: GPU time by kernel class

Prints one JSON object. Tokens/s counts real (non-pad) tokens; MFU (GPU) counts useful FLOPs
(matmuls + attention over real tokens, x3 for forward + backward) against the bf16 dense peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODIFIERS = ("cudnn", "perseq", "nodrop")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def lengths_for(args) -> np.ndarray:
    rng = np.random.default_rng(args.seed)
    n = args.cells_per_step * (args.steps + args.warmup)
    lens = np.exp(rng.normal(np.log(args.median), args.sigma, size=n))
    return np.clip(np.round(lens), args.min_len, args.cap).astype(np.int64)


def make_cells(args, n_ccres: int):
    rng = np.random.default_rng(args.seed + 1)
    return [rng.choice(n_ccres, size=int(n), replace=False) + 4 for n in lengths_for(args)]


def attention_flops(cfg, lens) -> float:
    """Forward+backward FLOPs of the attention products (QK^T and AV) of one step over real tokens."""
    lens = np.asarray(lens, dtype=np.float64) + 2
    return 3.0 * float((cfg.num_layers * 4 * cfg.dim * lens ** 2).sum())


def useful_flops(cfg, lens) -> float:
    """Forward+backward FLOPs of one step over real tokens (matmuls, attention, signal decoder)."""
    D, F, Lyr = cfg.dim, cfg.ffn, cfg.num_layers
    lens = np.asarray(lens, dtype=np.float64) + 2
    per_tok = Lyr * 2 * (4 * D * D + 2 * D * F)
    dec = 2 * D * cfg.n_ccres
    rlm = 2 * (D * cfg.rlm_hidden + cfg.rlm_hidden)
    return 3.0 * float((lens * (per_tok + rlm) + dec).sum()) + attention_flops(cfg, lens - 2)


def parse_variant(variant: str) -> tuple[str, list[str]]:
    backend, *mods = variant.split("+")
    if set(mods) - set(MODIFIERS):
        raise SystemExit(f"unknown variant {variant!r}: a backend, optionally with "
                         + ", ".join(f"'+{m}'" for m in MODIFIERS))
    return backend, mods


def worker(args, emit=None) -> list[dict]:
    """Every variant of ``args.variant`` (a comma list) on ONE model in this process: on CUDA the model is
    built once (start-up, CUDA context and the 1.45 B-parameter build cost more than the timed steps),
    the peak memory is reset before each variant's timed steps, and a variant that fails (out of memory, or
    a kernel that raises) becomes an error entry. ``emit(results)`` after each variant: the parent keeps
    what finished if the process dies later (a CUDA fault)."""
    import torch

    from epiflow.model import EpiAgentConfig, from_config
    from epiflow.model.epiagent import SelfAttention

    variants = [(v, *parse_variant(v)) for v in args.variant.split(",")]
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    overrides = {"dropout": 0.1}
    if args.n_ccres:
        overrides["n_ccres"] = args.n_ccres
    cfg = EpiAgentConfig.preset(args.config, **overrides)
    with torch.device(dev):  # build in place (the paper model is 1.45 B parameters)
        model = from_config(cfg).train()
    if args.checkpointing:
        model.set_gradient_checkpointing(True)
    cells = make_cells(args, cfg.n_ccres)
    out = []
    # a modifier turns its setting on; without it the caller's environment holds (gpu_check sets
    # EPIFLOW_PACKED_PER_SEQUENCE=1 for every part when the varlen kernel failed its golden check)
    caller = {k: os.environ.get(k) for k in ("EPIFLOW_SDPA_CUDNN", "EPIFLOW_PACKED_PER_SEQUENCE")}
    for name, backend, mods in variants:
        # '+cudnn': let SDPA use cuDNN attention on CUDA (epiflow's default leaves it out, see
        # epiflow.model.attention.cudnn_sdpa_allowed); '+perseq': the packed backend's one SDPA call per
        # sequence instead of one varlen flash call per batch (epiflow.model.attention.packed_kernel);
        # '+nodrop': no dropout (the paper trains with 0.1, attention probabilities included)
        for key, mod in (("EPIFLOW_SDPA_CUDNN", "cudnn"), ("EPIFLOW_PACKED_PER_SEQUENCE", "perseq")):
            value = "1" if mod in mods else caller[key]
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        p = 0.0 if "nodrop" in mods else cfg.dropout
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = p
            elif isinstance(m, SelfAttention):
                m.dropout = p
        try:
            out.append(run_variant(args, model, cfg, cells, name, backend))
        except torch.cuda.OutOfMemoryError as exc:
            out.append({"variant": name, "error": f"CUDA out of memory: {str(exc).splitlines()[0][:300]}"})
        except Exception as exc:  # noqa: BLE001 - a kernel that raises fails its variant alone
            out.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
        if emit is not None:
            emit(out)
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def run_variant(args, model, cfg, cells, name: str, backend: str) -> dict:
    import torch

    from epiflow.model import losses

    dev = torch.device(args.device)
    B = args.cells_per_step
    batches = [cells[i:i + B] for i in range(0, len(cells), B)]
    amp = dev.type == "cuda"

    def step(batch):
        lens = np.array([len(c) + 2 for c in batch])
        if backend == "sdpa":
            ids = np.zeros((len(batch), lens.max()), dtype=np.int64)
            for i, c in enumerate(batch):  # a handful of cells per step
                ids[i, 0], ids[i, 1:len(c) + 1], ids[i, len(c) + 1] = 1, c, 2
            ids = torch.from_numpy(ids).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                out = model(ids, backend="sdpa")
                tok_rows = out.hidden[ids >= 4]
                cell = out.cell_embedding
            flat_ids = ids[ids >= 4]
        else:
            flat = np.concatenate([np.concatenate([[1], c, [2]]) for c in batch])
            tokens = torch.from_numpy(flat).to(dev)
            cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)])).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                po = model.encode_packed(tokens, cu, backend=backend)
                tok_rows = po.hidden[tokens >= 4]
                cell = po.cell_embedding
            flat_ids = tokens[tokens >= 4]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            sig = model.signal_logits(cell)
            rlm = model.rlm_logits(tok_rows)
        rows = torch.repeat_interleave(torch.arange(len(batch), device=dev), torch.as_tensor(lens - 2, device=dev))
        target = (flat_ids % 2).float()  # arbitrary labels; the cost does not depend on them
        loss = losses.sr_loss_sparse(sig.float(), rows, flat_ids - 4) + losses.rlm_loss(rlm.float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for b in batches[:args.warmup]:
        step(b)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    timed = batches[args.warmup:]
    t0 = time.perf_counter()
    for b in timed:
        step(b)
    sync()
    dt = time.perf_counter() - t0
    breakdown = None
    if args.profile or args.breakdown:  # one more step under the profiler: where a step's time goes
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        prof_batch = timed[0] if timed else batches[0]
        with profile(activities=acts) as prof:
            step(prof_batch)
            sync()
        averages = prof.key_averages()
        if args.profile:
            key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            Path(f"{args.profile}.{name}.txt").write_text(
                averages.table(sort_by=key, row_limit=30, max_name_column_width=60))
        if args.breakdown:
            breakdown = kernel_breakdown(averages, dev.type == "cuda", cfg, [len(c) for c in prof_batch])
    real = int(sum(len(c) + 2 for b in timed for c in b))
    padded = int(sum(len(b) * (max(len(c) for c in b) + 2) for b in timed))
    res = {"variant": name, "steps": len(timed), "seconds": round(dt, 3),
           "step_s": round(dt / len(timed), 4), "tokens": real, "tokens_per_s": round(real / dt, 1),
           "pad_fraction": round(1 - real / padded, 3)}
    if dev.type == "cuda":
        res["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        name = torch.cuda.get_device_name(dev)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        fl = sum(useful_flops(cfg, [len(c) for c in b]) for b in timed)
        res["tflops"] = round(fl / dt / 1e12, 2)
        res["mfu"] = None if peak is None else round(fl / dt / (peak * 1e12), 4)
    else:
        res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        res["peak_rss_over_start_mb"] = round(res["peak_rss_mb"] - base_rss, 1)
    if dev.type == "cuda" or backend == "packed":
        from epiflow.model.attention import packed_kernel_for

        res["packed_kernel"] = (packed_kernel_for(dev, torch.bfloat16 if amp else torch.float32)
                                if backend == "packed" else None)
    if breakdown is not None:
        res["breakdown"] = breakdown
    return res


# kernel (CUDA) or operator (CPU) names, lower case, by class; attention is tested first (fmha_cutlass...)
ATTENTION_NAMES = ("flash", "fmha", "attention", "attn", "sdpa")
MATMUL_NAMES = ("gemm", "nvjet", "xmma", "cublas", "cutlass", "matmul", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::baddbmm")


def kernel_breakdown(averages, cuda: bool, cfg, lens) -> dict:
    """GPU time of one profiled step by class of kernel (attention, matmul, other), and the rate of the
    attention kernels and of the matmuls over the useful FLOPs of each (``useful_flops`` split): whether a
    low MFU is the attention kernel's or the rest's. CUDA: kernel events' own time; CPU: operators' self
    time (attention = the fused SDPA operators; a decomposed math path counts as matmul and other)."""
    times = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    for e in averages:
        if cuda:
            if "cuda" not in str(getattr(e, "device_type", "")).lower():
                continue  # CPU-side operators: their kernels are counted as kernel events
            t = float(getattr(e, "self_device_time_total", 0.0) or 0.0)
        else:
            t = float(e.self_cpu_time_total)
        if t <= 0:
            continue
        name = e.key.lower()
        cls = ("attention" if any(n in name for n in ATTENTION_NAMES)
               else "matmul" if any(n in name for n in MATMUL_NAMES) else "other")
        times[cls] += t / 1e3  # us -> ms
    total = sum(times.values())
    attn_fl = attention_flops(cfg, lens)
    other_fl = useful_flops(cfg, lens) - attn_fl

    def rate(fl, ms):
        return round(fl / (ms / 1e3) / 1e12, 2) if ms > 0 else None

    return {"clock": "GPU kernel time" if cuda else "CPU operator self time", "total_ms": round(total, 2),
            "ms": {k: round(v, 2) for k, v in times.items()},
            "share": {k: (round(v / total, 3) if total else None) for k, v in times.items()},
            "attention_tflops": rate(attn_fl, times["attention"]),
            "matmul_tflops": rate(other_fl, times["matmul"]),
            "flops_share_attention": round(attn_fl / (attn_fl + other_fl), 3)}


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps, short cells (CI / shared CPUs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default=None, help="model preset (default: small on CPU, paper on CUDA)")
    ap.add_argument("--n-ccres", type=int, default=None, help="vocabulary (default: 50,000 for small, preset for paper)")
    ap.add_argument("--variants", default=None, help="comma list of sdpa, packed, flash, each optionally with "
                    "modifiers: '+cudnn' lets SDPA use cuDNN attention on CUDA, '+perseq' makes packed run one "
                    "SDPA call per sequence (not one varlen flash call), '+nodrop' trains without dropout")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cells-per-step", type=int, default=4, help="cells per step (paper: 4 per GPU)")
    ap.add_argument("--median", type=float, default=None, help="median sentence length")
    ap.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of lengths")
    ap.add_argument("--cap", type=int, default=8190)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", metavar="PREFIX", help="also profile one step per variant (torch.profiler) "
                    "and write its op table to PREFIX.<variant>.txt")
    ap.add_argument("--breakdown", action="store_true", help="profile one more step per variant and report its "
                    "GPU time by kernel class (attention, matmul, other) with each class's TFLOP/s")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.config = args.config or ("paper" if cuda else "small")
    if args.n_ccres is None and args.config != "paper":
        args.n_ccres = 50_000
    if args.quick:
        args.steps = args.steps or 2
        args.median = args.median or 300
        args.cap = min(args.cap, 1022)
    args.steps = args.steps or (10 if cuda else 4)
    args.median = args.median or 2000
    if args.variant:  # one JSON line per finished variant, the last one complete
        worker(args, emit=lambda results: print(json.dumps(results), flush=True))
        return 0
    variants = (args.variants or ("sdpa,packed,flash" if cuda else "sdpa,packed")).split(",")
    lens = lengths_for(args)
    out = {"benchmark": "train step (forward + backward), padded vs packed attention",
           "device": args.device, "config": args.config, "n_ccres": args.n_ccres or "preset",
           "quick": args.quick, "threads": args.threads, "cells_per_step": args.cells_per_step,
           "steps": args.steps, "lengths": {"median": float(np.median(lens)), "mean": float(lens.mean()),
                                            "max": int(lens.max()), "cap": args.cap, "sigma": args.sigma},
           "results": {}}
    if cuda:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    base = [sys.executable, os.path.abspath(__file__)] + [a for a in (argv if argv is not None else sys.argv[1:])]
    for v in variants:
        parse_variant(v)  # a bad name fails here, before any model is built
    # CUDA: every variant in one process (one start-up and model build; peak memory reset per variant);
    # CPU: one process per variant, so that each peak RSS is its own
    groups = [variants] if cuda else [[v] for v in variants]
    for group in groups:
        cmd = base + ["--variant", ",".join(group), "--config", args.config, "--steps", str(args.steps),
                      "--median", str(args.median), "--cap", str(args.cap)]
        if args.n_ccres:
            cmd += ["--n-ccres", str(args.n_ccres)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        done = []  # the variants that finished before the process ended (all of them, unless it died)
        for line in reversed(proc.stdout.strip().splitlines()):
            try:
                done = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
        for res in done:
            out["results"][res["variant"]] = res
        if proc.returncode != 0:
            err = {"error": f"exit {proc.returncode}: "
                   + (proc.stderr.strip().splitlines() or ["failed"])[-1][:400]}
            out["results"].update({v: err for v in group if v not in out["results"]})
    r = out["results"]
    if "tokens_per_s" in r.get("sdpa", {}) and "tokens_per_s" in r.get("packed", {}):
        out["packed_over_padded"] = round(r["packed"]["tokens_per_s"] / r["sdpa"]["tokens_per_s"], 2)
    if "tokens_per_s" in r.get("flash", {}) and "tokens_per_s" in r.get("packed", {}):
        out["flash_over_packed"] = round(r["flash"]["tokens_per_s"] / r["packed"]["tokens_per_s"], 2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
