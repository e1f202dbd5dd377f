"""One prepared GPU check (issue #20): the figures and checks that need a GPU, in one command.

Each part runs in its own subprocess with its own timeout (a failure or hang becomes
``{"ok": false, "error": "...", "seconds": ...}``, with the figures the part had reported so far marked
``"partial": true``, and the next part runs):

* ``env``          torch, CUDA, device, bf16, NCCL, flash-attn (``--try-flash-attn``: pip install it)
* ``golden``       the golden fixtures on the device, every attention backend: fp32 to the tests' tolerance,
                   bf16 autocast to a looser stated one (max abs / rel error per output)
* ``bench_model``  benchmarks/bench_model.py (paper config, bf16): realistic lengths, and packed at L = 8,192
* ``bench_train``  benchmarks/bench_train.py --paper --checkpointing: dense, memory-lean and memory-lean with
                   activation checkpointing: peak memory, training state, tokens/s, analytic expected peaks
* ``pretrain_cli`` ``epiflow pretrain`` (paper config, bf16, memory-lean) stopped by SIGUSR1, then ``--resume``
* ``torchrun``     a 1-GPU torchrun NCCL all-reduce, and ``epiflow pretrain-launch`` for a few steps
* ``tasks``        ``epiflow simulate --preset test`` -> corpus -> ``epiflow annotate`` and ``epiflow embed``
* ``compile``      ``epiflow pretrain --compile`` beside the same run without it

If golden finds the packed backend's varlen flash kernel broken (``packed_fallback``), the parts after it run
the per-sequence loop (``EPIFLOW_PACKED_PER_SEQUENCE=1``) and the JSON says why, so one kernel cannot cost
the whole check.

Prints ONE JSON object (parts, goals) on stdout, also written to OUT/gpu_check.json (after every part);
the parts' output goes to OUT/gpu_check.log.

    python benchmarks/gpu_check.py                         # GPU machine, < 8 min on one H100/H200
    python benchmarks/gpu_check.py --cpu-smoke --out DIR   # every part on CPU, tiny sizes (tests)
    python benchmarks/gpu_check.py --install               # bash scripts/setup_env.sh first, then .venv/bin/python

See benchmarks/README.md, "GPU check (gpu_check.py)".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the order they run in: the short pass/fail parts first (does every CUDA path run?), then the long
# measurements, so a budget that runs out cuts a measurement, not a check (run 3 lost torchrun and tasks)
# (compile last: the least important figure, and its time is the least known)
PARTS = ("env", "golden", "tasks", "torchrun", "bench_model", "pretrain_cli", "bench_train", "compile")
TIMEOUT_S = {"env": 60, "golden": 90, "bench_model": 150, "bench_train": 300, "pretrain_cli": 210,
             "torchrun": 120, "tasks": 120, "compile": 150}
# bench_train's lean+ckpt run with one cell per micro-batch: cells are up to 8,190 tokens + [CLS]/[SEP]
# (CPU smoke: --max-len 126)
ONE_CELL_BATCH_TOKENS = {False: 8192, True: 128}
# bf16 dense tensor-core peak (TFLOP/s) by device name, first match; NVL parts run at other clocks: unknown
PEAK_BF16_TFLOPS = (("NVL", None), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
FP32_TOL = 1e-5  # atol = rtol, as tests/test_model.py
BF16_TOL = 5e-2  # atol = rtol; CPU bf16 autocast gave <= 0.01 max abs error on these fixtures
# LEAN_STATE_GB: epiflow.train.lean.memory_estimate of the paper config with the CUDA chunks (RLM epochs;
# tests/test_gpu_check.py keeps it equal)
LEAN_STATE_GB, LEAN_TARGET_GB, MFU_TARGET, TOTAL_TARGET_S = 7.66, 7.74, 0.40, 480


# the paper-size parts write checkpoints and training states: on the first H200 runs ~80 GB, which took
# ~2.5 of the check's ~9 minutes (~0.6 GB/s to the VM's disk). Since session 14 bench_train writes none (it
# measures the state in memory), leaving ~40 GB (the stop, resume and end of pretrain_cli, torchrun's
# run: lean states of ~6.5 GB and checkpoints of ~5.8 GB). RAM-backed /dev/shm, when it has this much
# room, is used instead (at most ~20 GB at a time: a state, its checkpoint and the next state's temp file)
SHM_MIN_FREE_GB = 32


def scratch_parent(smoke: bool, shm: str | os.PathLike = "/dev/shm") -> tuple[str | None, str]:
    """Where the default scratch folder goes, and why: ``shm`` with at least SHM_MIN_FREE_GB free (GPU
    mode), else the temporary folder ($TMPDIR)."""
    if smoke:
        return None, "temporary folder (CPU smoke: small files)"
    try:
        free = shutil.disk_usage(shm).free / 1e9
    except OSError:
        return None, f"temporary folder ({shm} not found)"
    if free >= SHM_MIN_FREE_GB:
        return str(shm), f"{shm} ({free:.0f} GB free, RAM-backed: fast checkpoint writes)"
    return None, f"temporary folder ({shm} has {free:.0f} GB free, under {SHM_MIN_FREE_GB} GB)"


class Skip(Exception):
    """A part that does not apply here: reported as ``{"skipped": reason}``."""


def peak_tflops(name: str | None) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS if name and k.lower() in name.lower()), None)


def _tail(text: str, n: int = 15, chars: int = 2000) -> str:
    return "\n".join((text or "").strip().splitlines()[-n:])[-chars:]


def _exc_text(exc: BaseException) -> str:
    """An exception as a part's JSON reports it: its type and the tail of its message."""
    return _tail(f"{type(exc).__name__}: {exc}")


def _last_json(text: str):
    """The (possibly indented) JSON object a benchmark printed last."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads("\n".join(lines[i:]))
    raise ValueError("no JSON object in the output: " + _tail(text, 5))


def _g(x, digits: int = 4):
    return None if x is None else float(f"{float(x):.{digits}g}")


# ================================================================================================ parts
class Ctx:
    def __init__(self, args):
        self.args, self.smoke, self.dev = args, args.cpu_smoke, "cpu" if args.cpu_smoke else "cuda"
        self.work, self.py = Path(args.workdir), sys.executable
        self.deadline = args.deadline or time.time() + 3600

    def left(self, margin: float = 5.0) -> float:
        return max(1.0, self.deadline - time.time() - margin)

    def partial(self, res: dict) -> None:
        """Report what the part has measured so far: if it then dies (a CUDA fault) or runs out of time, the
        driver keeps these figures beside the error (``"partial": true``)."""
        if getattr(self.args, "result", None):
            from epiflow.io import atomic_write_text

            atomic_write_text(self.args.result, json.dumps({**res, "partial": True}, default=str))

    def run(self, cmd, env=None, what="") -> subprocess.CompletedProcess:
        """Run a command, output captured (its stderr tail goes to this part's log); ``what``: raise on failure."""
        cmd = [str(x) for x in cmd]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=self.left())
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{what or Path(cmd[1]).name} timed out after {exc.timeout:.0f} s (the part's "
                               f"deadline): {_tail(str(exc.stderr or ''), 5)}") from None
        print(_tail(r.stderr, 40, 6000), file=sys.stderr, flush=True)
        if r.returncode and what:
            raise RuntimeError(f"{what}: exit code {r.returncode}: {_tail(r.stderr)}")
        return r


def _cli(argv) -> int:
    from epiflow.cli import main

    return main([str(a) for a in argv])


def _flash_version(py: str) -> str | None:
    """flash-attn's version if it imports (in a fresh process: sees a package installed just now)."""
    r = subprocess.run([py, "-c", "import flash_attn; print(flash_attn.__version__)"], capture_output=True, text=True,
                       timeout=120)
    return r.stdout.strip() or "?" if r.returncode == 0 else None


def part_env(c: Ctx) -> dict:
    import platform

    import torch
    import torch.distributed as dist

    r = {"ok": True, "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(), "cpus": os.cpu_count(),
         "nccl_available": dist.is_available() and dist.is_nccl_available(),
         "gloo_available": dist.is_available() and dist.is_gloo_available(),
         "tf32_matmul_allowed": torch.backends.cuda.matmul.allow_tf32}
    if r["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        r.update(device_name=p.name, capability=list(torch.cuda.get_device_capability(0)),
                 memory_gb=round(p.total_memory / 1e9, 1), multiprocessors=p.multi_processor_count,
                 bf16_supported=torch.cuda.is_bf16_supported(), peak_bf16_dense_tflops=peak_tflops(p.name))
        with contextlib.suppress(Exception):
            r["nccl_version"] = str(torch.cuda.nccl.version())
    from epiflow.model.attention import _flash_varlen_op

    r["torch_flash_varlen_op"] = _flash_varlen_op() is not None
    with contextlib.suppress(Exception):
        r["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                          "--format=csv,noheader"], capture_output=True, text=True,
                                         timeout=20).stdout.strip() or None
    fa = {"version": _flash_version(c.py)}
    if fa["version"] is None and c.args.try_flash_attn:
        if c.smoke:
            fa["install"] = {"skipped": "cpu-smoke"}
        else:
            t = time.time()
            try:
                q = subprocess.run([c.py, "-m", "pip", "install", "--no-build-isolation", "--retries", "0", "--timeout",
                                    "15", "flash-attn"], capture_output=True, text=True,
                                   timeout=min(c.args.flash_attn_timeout, c.left(130)))
                fa["install"] = {"ok": q.returncode == 0, "error": _tail(q.stderr or q.stdout, 6, 800) or None}
            except subprocess.TimeoutExpired:
                fa["install"] = {"ok": False, "error": "pip install flash-attn timed out"}
            fa["install"]["seconds"] = round(time.time() - t, 1)
            fa["version"] = _flash_version(c.py)
    r["flash_attn"] = dict(fa, importable=fa["version"] is not None)
    return r


def _fixtures_dir(c: Ctx) -> Path:
    shared = os.environ.get("EPIFLOW_SHARED")
    for p in (c.args.fixtures, shared and Path(shared) / "fixtures", ROOT.parent / "shared" / "fixtures",
              ROOT / "shared" / "fixtures"):
        if p and (Path(p) / "epiagent_tiny.pth").exists():
            return Path(p)
    raise Skip("golden fixtures not found (--fixtures DIR, $EPIFLOW_SHARED/fixtures or ../shared/fixtures)")


def _golden_outputs(model, d: dict, kind: str, dev) -> dict:
    """``{name: (output, reference)}`` of one fixture batch: encoder, heads, losses (pad positions dropped)."""
    import torch

    from epiflow.model import expand_rows, losses, token_mask

    t = {k: torch.from_numpy(v).to(dev) for k, v in d.items() if v.dtype.kind in "biuf"}
    mask, m, ids = d["attention_mask"], t["attention_mask"], t["input_ids"]
    o = model(ids, batch_ids=t["batch_ids"] if kind == "bc" else None)
    res = {"transformer_outputs": (o.hidden[m], d["transformer_outputs"][mask]), "cls": (o.cell_embedding, d["cls"])}
    if kind == "supervised":
        logits = model.classify(o.cell_embedding)
        res["logits"] = (logits, d["logits"])
        res["focal_loss"] = (losses.focal_loss(logits.float(), t["class_target"]), d["focal_loss"])
        return res
    sig = model.signal_logits(o.cell_embedding)
    cca = model.cca_logits(expand_rows(o.cell_embedding, t["cca_offsets"]), t["cca_ids"])
    rlm = model.rlm_logits(o.hidden[token_mask(ids)])
    res.update(signal_logits=(sig, d["signal_logits"]), cca_logits=(cca, d["cca_logits"]),
               rlm_logits=(rlm, d["rlm_logits"]))
    for name, logit, pw in (("sr", sig, "SR"), ("cca", cca, "CCA"), ("rlm", rlm, "RLM")):
        loss = getattr(losses, f"{name}_loss")(logit.float(), t[f"{name}_target"], model.pos_weight(pw))
        res[f"{name}_loss"] = (loss, d[f"{name}_loss"])
    if kind == "bc":
        nob = model(ids)
        res["transformer_outputs_no_batch"] = (nob.hidden[m], d["transformer_outputs_no_batch"][mask])
        res["cls_no_batch"] = (nob.cell_embedding, d["cls_no_batch"])
        res["signal_logits_no_batch"] = (model.signal_logits(nob.cell_embedding), d["signal_logits_no_batch"])
    return res


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _guarded(fn, *args) -> dict:
    """``fn(*args)``, or ``{"ok": false, "error": ...}`` if it raises: a check inside a part fails alone."""
    try:
        return fn(*args)
    except Exception as exc:  # reported, not raised: the rest of the part stands
        return {"ok": False, "error": _exc_text(exc)}


def packed_kernel_check(dev, smoke: bool) -> dict:
    """The packed backend's kernel on the device (CUDA bf16: one varlen FlashAttention-2 call for the whole
    batch, attention dropout included) against one SDPA call per sequence, on q/k/v cut from a fused
    ``[T, 3, H, d]`` projection as the model does: without dropout, the output and the gradient of the
    projection agree to the bf16 tolerance; with the paper's attention dropout (0.1), a single draw moves
    the output as far as the per-sequence kernel's draw does (the same dropout rate), and the mean of
    ``draws`` draws comes as close to the dropout-free output as the per-sequence kernel's mean (attention
    dropout is unbiased). On CPU both are the per-sequence kernel: the check only runs."""
    import torch

    from epiflow.model import attention as A

    lens, H, d, draws = ([20, 60, 120], 2, 8, 8) if smoke else ([37, 300, 1000, 2048], 8, 64, 32)
    dtype, p = (torch.bfloat16 if dev.type == "cuda" else torch.float32), 0.1
    g = torch.Generator().manual_seed(0)
    T = sum(lens)
    qkv0 = torch.randn(T, 3, H, d, generator=g).to(dev, dtype)
    grad_out = torch.randn(T, H, d, generator=g).to(dev, dtype)
    packing = A.Packing.from_lengths(lens, device=dev)

    def run(per_seq: bool, dropout: float, grad: bool):
        with _env("EPIFLOW_PACKED_PER_SEQUENCE", "1" if per_seq else "0"):
            qkv = qkv0.clone().requires_grad_(grad)
            q, k, v = qkv.unbind(1)
            kernel = A.packed_kernel(q)
            out = A.attention_packed(q, k, v, packing, dropout)
            if grad:
                out.backward(grad_out)
        return kernel, out.detach().float(), (qkv.grad.float() if grad else None)

    def close(a, b):
        diff = (a - b).abs()
        return {"max_abs": _g(float(diff.max()), 3), "max_rel": _g(float(diff.max() / b.abs().max().clamp_min(1e-30)), 3),
                "ok": bool((diff <= BF16_TOL + BF16_TOL * b.abs()).all())}

    kernel, out_v, grad_v = run(False, 0.0, True)
    ref_kernel, out_s, grad_s = run(True, 0.0, True)
    r = {"kernel": kernel, "reference": ref_kernel, "lengths": lens, "heads": H, "head_dim": d,
         "dtype": str(dtype).replace("torch.", ""), "no_dropout": {"output": close(out_v, out_s),
                                                                    "grad_qkv": close(grad_v, grad_s)}}
    _, _, grad_drop = run(False, p, True)
    mean = {}
    single = {}
    for name, per_seq in (("kernel", False), ("reference", True)):
        acc = torch.zeros_like(out_s)
        for i in range(draws):
            out = run(per_seq, p, False)[1]
            if i == 0:
                single[name] = float((out - out_s).abs().mean())
            acc += out
        mean[name] = float((acc / draws - out_s).abs().mean())
    ratio_single = single["kernel"] / max(single["reference"], 1e-30)
    ratio_mean = mean["kernel"] / max(mean["reference"], 1e-30)
    r["dropout"] = {"p": p, "draws": draws, "single_draw_mae": {k: _g(v, 3) for k, v in single.items()},
                    "mean_of_draws_mae": {k: _g(v, 3) for k, v in mean.items()},
                    "single_ratio": round(ratio_single, 3), "mean_ratio": round(ratio_mean, 3),
                    "grad_finite": bool(torch.isfinite(grad_drop).all()),
                    "ok": bool(single["kernel"] > 0 and 0.8 <= ratio_single <= 1.25 and ratio_mean <= 1.25
                               and torch.isfinite(grad_drop).all())}
    r["ok"] = r["no_dropout"]["output"]["ok"] and r["no_dropout"]["grad_qkv"]["ok"] and r["dropout"]["ok"]
    return r


def part_golden(c: Ctx) -> dict:
    import numpy as np
    import torch

    from epiflow.model import load_epiagent_checkpoint

    fx, dev = _fixtures_dir(c), torch.device(c.dev)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    backends = ["sdpa", "packed"] + (["flash"] if c.dev == "cuda" and _flash_version(c.py) else [])
    runs, fails = {}, {"fp32": 0, "bf16": 0}
    for name, kind in (("epiagent_tiny", "base"), ("epiagent_tiny_supervised", "supervised"),
                       ("epiagent_tiny_bc", "bc")):
        d = dict(np.load(fx / f"{name}_io.npz", allow_pickle=False))
        for backend in backends:
            model = load_epiagent_checkpoint(fx / f"{name}.pth", num_heads=4, backend=backend, device=dev)
            for prec, tol in (("fp32", FP32_TOL), ("bf16", BF16_TOL)):
                if backend == "flash" and prec == "fp32":
                    continue  # flash-attn runs in fp16 / bf16 only
                try:  # a run that raises fails alone: the other backends' figures stand
                    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                        outs = _golden_outputs(model, d, kind, dev)
                except Exception as exc:  # noqa: BLE001 - reported in the JSON
                    fails[prec] += 1
                    runs[f"{name}/{backend}/{prec}"] = {"ok": False, "error": _exc_text(exc)}
                    continue
                entry, ok = {}, True
                for key, (a, ref) in outs.items():
                    ref = np.asarray(ref, dtype=np.float64)
                    diff = np.abs(a.detach().float().cpu().numpy().astype(np.float64).reshape(ref.shape) - ref)
                    good = bool(np.all(diff <= tol + tol * np.abs(ref)))
                    ok &= good
                    rel = diff.max() / max(np.abs(ref).max(), 1e-30)
                    entry[key] = {"max_abs": _g(diff.max(), 3), "max_rel": _g(rel, 3)}
                    if not good:
                        entry[key]["ok"] = False
                fails[prec] += not ok
                runs[f"{name}/{backend}/{prec}"] = {"ok": ok, "outputs": entry}
            c.partial({"ok": False, "device": str(dev), "backends": backends, "runs": runs})
    return {"ok": True, "device": str(dev), "fixtures": str(fx), "backends": backends,
            "packed_kernel": _guarded(packed_kernel_check, dev, c.smoke),
            "tolerance": {"fp32": f"atol = rtol = {FP32_TOL:g}", "bf16": f"atol = rtol = {BF16_TOL:g}"},
            "max_rel_is": "max |out - ref| / max |ref| per output (pad positions excluded)",
            "fp32_ok": fails["fp32"] == 0, "bf16_ok": fails["bf16"] == 0, "fp32_failures": fails["fp32"],
            "bf16_failures": fails["bf16"], "runs": runs}


def part_bench_model(c: Ctx) -> dict:
    import torch

    peak = peak_tflops(torch.cuda.get_device_name(0) if c.dev == "cuda" else None)
    flash = ["flash"] if c.dev == "cuda" and _flash_version(c.py) else []
    # packed = one varlen flash call per batch on CUDA (since session 13), packed+perseq = the one SDPA call
    # per sequence that runs 1-3 measured; at L = 8,192 also packed+nodrop (the cost of the paper's
    # attention dropout) and the GPU time by kernel class (--breakdown). cuDNN attention with dropout (off by
    # default) is no longer compared: 2.6-6.7x slower at realistic lengths, 9 % faster at L = 8,192 (H200,
    # runs 2-3)
    variants = ["sdpa", "packed", "packed+perseq"] + flash
    # packed+nodrop+cudnn: whether a Hopper attention kernel (cuDNN's, graphs cached at one length) reaches the
    # MFU goal without the dropout; cuDNN runs per sequence (epiflow.model.attention.packed_kernel)
    long_variants = ["packed", "packed+perseq", "packed+nodrop"] + (["packed+nodrop+cudnn"] if c.dev == "cuda" else [])
    if c.smoke:
        base, realistic, L = ["--device", "cpu", "--config", "tiny", "--n-ccres", "2000", "--steps", "2"], \
            ["--median", "64", "--cap", "254", "--min-len", "20"], 254
    else:
        base, realistic, L = ["--device", "cuda", "--config", "paper"], [], 8190
    r = {"ok": True, "config": "tiny" if c.smoke else "paper", "precision": "fp32" if c.smoke else "bf16 autocast",
         "peak_bf16_dense_tflops": peak}
    for key, extra in (("realistic", [*realistic, "--variants", ",".join(variants)]),
                       ("long_L", ["--variants", ",".join(long_variants), "--breakdown", "--median", L, "--sigma",
                                   "0", "--cap", L, "--min-len", L])):
        try:
            out = _last_json(c.run([c.py, ROOT / "benchmarks" / "bench_model.py", *base, *extra],
                                   what="bench_model.py").stdout)
        except Exception as exc:
            r[key], r["ok"] = {"ok": False, "error": _tail(str(exc))}, False
            continue
        res = {}
        for v, b in out.get("results", {}).items():
            res[v] = {"ok": False, "error": b["error"]} if "error" in b else {
                **{k: b.get(k) for k in ("tokens_per_s", "step_s", "tflops", "peak_mem_mb", "peak_rss_mb",
                                         "packed_kernel", "breakdown") if k in b},
                "mfu": None if peak is None or b.get("tflops") is None else round(b["tflops"] / peak, 4)}
        r[key] = {"lengths": out.get("lengths"), "tokens_per_cell": L + 2 if key == "long_L" else None,
                  "pad_fraction": next((b.get("pad_fraction") for b in out.get("results", {}).values()), None),
                  "variants": res}
        r["ok"] &= all(v.get("ok", True) for v in res.values())
    return r


def part_bench_train(c: Ctx) -> dict:
    # three pretraining subprocesses: dense, lean, lean + activation checkpointing (3 steps each at paper size)
    args = ["--device", "cpu", "--n-ccres", "3000", "--dim", "32", "--layers", "2", "--cells", "40", "--steps", "2",
            "--batch-tokens", "1024", "--max-len", "126"] if c.smoke else ["--device", "cuda", "--paper", "--steps", "3"]
    out = _last_json(c.run([c.py, ROOT / "benchmarks" / "bench_train.py", *args, "--checkpointing"],
                           what="bench_train.py").stdout)
    sc, pe = out["scaled"], out["paper_estimate"]
    est = sc.get("estimate", {})
    gb = 2**20 / 1e9  # MiB -> GB
    r = {"ok": True, "sizes": {k: sc.get(k) for k in ("n_ccres", "dim", "layers", "cells", "steps", "max_len")},
         "analytic_state_gb": {"dense": pe["dense_fp32_adamw_gb"]["total"], "lean": pe["lean_gb_rlm_epochs"]["total"],
                               "target": pe["target_one_third_gb"]},
         "paper_activations_gb": pe.get("activations_gb"),
         "paper_expected_lean_peak_gb": pe.get("expected_lean_peak_gb"),
         "expected_peak_gb": {m: round(v * gb, 3) for m, v in (est.get("expected_peak_mb") or {}).items()},
         "expected_peak_is": est.get("expected_peak_is"),
         "encoder_activations_gb": {k: round(v * gb, 3) if k != "tokens_per_micro_batch" else v
                                    for k, v in (est.get("encoder_activations_mb") or {}).items()},
         "peak_is": "max_memory_allocated" if c.dev == "cuda" else "peak RSS over RSS after imports"}
    def figures(m: dict) -> dict:  # one mode's run of bench_train
        return {"peak_gb": round(m["peak_over_start_mb"] * gb, 3), "steps": m["steps"],
                "state_gb": round(m["state_total_mb"] * gb, 3),
                "tokens_per_s": round(m["tokens_per_s_median_after_first"], 1), "checkpointing": m.get("checkpointing")}

    for mode in ("dense", "lean", "lean+ckpt"):
        m = sc.get(mode, {"error": "missing"})
        if "error" in m:
            r[mode], r["ok"] = {"ok": False, "error": _tail(m["error"])}, False
        else:
            r[mode] = figures(m)
    if "peak_gb" in r["lean"] and "peak_gb" in r["lean+ckpt"]:
        a, b = r["lean"], r["lean+ckpt"]
        r["lean_ckpt_over_lean"] = {"peak": round(b["peak_gb"] / max(a["peak_gb"], 1e-9), 3),
                                    "tokens_per_s": round(b["tokens_per_s"] / max(a["tokens_per_s"], 1e-9), 3)}
    # the 7.74 GB goal with checkpointing needs fewer tokens per forward (benchmarks/README.md,
    # "Activation estimate"): lean + checkpointing once more with one cell per micro-batch, 4 micro-batches
    # a step (about the cells of a step above; the lean records of all micro-batches are kept until the
    # step), and the RLM copy in its own forward (rlm_separate): 8,192 tokens in the encoder at a time
    one = ONE_CELL_BATCH_TOKENS[c.smoke]
    args1 = _without(args, "--batch-tokens") + ["--batch-tokens", str(one), "--grad-accum", "4",
                                                "--rlm-separate", "--modes", "lean+ckpt"]
    try:
        o1 = _last_json(c.run([c.py, ROOT / "benchmarks" / "bench_train.py", *args1], what="bench_train.py").stdout)
        m = o1["scaled"].get("lean+ckpt", {"error": "missing"})
        if "error" in m:
            raise RuntimeError(_tail(m["error"]))
        e1 = o1["scaled"].get("estimate", {})
        r["lean+ckpt_one_cell"] = {
            "batch_tokens": one, "grad_accum": 4, "rlm_separate": True, **figures(m),
            "expected_peak_gb": round((e1.get("expected_peak_mb") or {}).get("lean+ckpt", float("nan")) * gb, 3),
            "encoder_activations_gb": round((e1.get("encoder_activations_mb") or {}).get("ckpt", float("nan")) * gb, 3)}
    except Exception as exc:  # the main figures above still count
        r["lean+ckpt_one_cell"], r["ok"] = {"ok": False, "error": _tail(str(exc))}, False
    return r


def _without(args: list, flag: str) -> list:
    """``args`` without ``flag`` and its value."""
    out, it = [], iter(args)
    for a in it:
        if a == flag:
            next(it, None)
        else:
            out.append(a)
    return out


def _corpus(c: Ctx) -> Path:
    """The pretraining corpus of pretrain_cli and torchrun, written once (by whichever part runs first)."""
    from epiflow.train import toy

    path = c.work / "corpus"
    if not (path / "corpus.json").exists():
        tmp = c.work / f".corpus.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        if c.smoke:
            toy.write_toy_corpus(tmp, n_cells=120, n_ccres=2000, n_types=4, seed=0, shard_size=60, p_in=0.05,
                                 p_out=0.005, p_common=0.1, frac_common=0.05)
        else:  # the paper's vocabulary size, ~2,000 accessible cCREs per cell
            toy.write_toy_corpus(tmp, n_cells=300, n_ccres=1_355_445, n_types=8, seed=0, shard_size=100,
                                 counts_fn=toy.sparse_counts)
        tmp.rename(path)
    return path


def _pretrain_argv(c: Ctx, corpus: Path, out: Path, max_steps: int) -> list:
    model, prec, extra = ("tiny", "fp32", ["--batch-tokens", "2048", "--epochs", "2", "--rlm-epochs", "1"]) \
        if c.smoke else ("paper", "bf16", ["--batch-tokens", "16384"])
    return ["pretrain", "--corpus", corpus, "--out", out, "--model-config", model, "--max-steps", max_steps,
            "--precision", prec, "--memory-lean", "--device", c.dev, "--no-progress", "--ckpt-every", "1000", *extra]


def _drop_big_files(folder: Path) -> None:
    for name in ("checkpoint.pth", "train_state.pt"):
        (folder / name).unlink(missing_ok=True)


def part_pretrain_cli(c: Ctx) -> dict:
    import pandas as pd

    corpus, out = _corpus(c), c.work / "pretrain"
    shutil.rmtree(out, ignore_errors=True)
    n, stop, delay = (6, 4, 0.4) if c.smoke else (40, 30, 0.4)
    argv = [c.py, "-m", "epiflow", *_pretrain_argv(c, corpus, out, n)]
    r = {"ok": False, "model_config": "tiny" if c.smoke else "paper", "device": c.dev, "max_steps": n,
         "how": f"run 1: --max-steps {n}, SIGUSR1 sent in the pause after step {stop - 1} "
                f"(EPIFLOW_TRAIN_STEP_DELAY={delay} s), so it saves after step {stop} and exits 138; run 2: the same "
                "command with --resume. A larger --max-steps on resume is refused by design (max_steps is one of "
                "PretrainConfig.RESUME_KEYS): checked after run 2."}
    metrics, t0 = out / "metrics.csv", time.time()
    with open(c.work / "pretrain_run1.log", "w") as log:
        p = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             env=dict(os.environ, EPIFLOW_TRAIN_STEP_DELAY=str(delay)))
        while p.poll() is None and time.time() < c.deadline - 60:
            if metrics.exists() and len(metrics.read_text().splitlines()) > stop - 1:  # header + stop-1 rows
                time.sleep(delay / 4)  # well inside the pause after step stop-1 (its stop check is done)
                p.send_signal(signal.SIGUSR1)
                break
            time.sleep(0.01)
        rc1 = p.wait(timeout=c.left())
    print(_tail((c.work / "pretrain_run1.log").read_text(), 30), file=sys.stderr)
    r["run1"] = {"exit_code": rc1, "seconds": round(time.time() - t0, 1),
                 "stopped_at_step": len(pd.read_csv(metrics)) if metrics.exists() else None}
    c.partial(r)
    t0 = time.time()
    # run 2 also profiles three whole steps (forward, backward, optimiser, lean tables: where a step's
    # time goes; epiflow.train.metrics.StepProfiler), the op table's head goes into the JSON
    prof = c.work / "pretrain_profile.txt"
    a_ = max(n - 4, (r["run1"]["stopped_at_step"] or 0) + 2)
    env2 = dict(os.environ, EPIFLOW_PROFILE_STEPS=f"{a_}:{a_ + 2}", EPIFLOW_PROFILE_OUT=str(prof))
    r["run2"] = {"exit_code": c.run([*argv, "--resume"], env=env2).returncode, "seconds": round(time.time() - t0, 1)}
    r["profile_steps"] = prof.read_text().splitlines()[:34] if prof.exists() else None
    m = pd.read_csv(metrics)
    summ = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    r["metrics_steps_once"] = m["step"].tolist() == list(range(1, n + 1))
    timed = m[~m["step"].isin({1, (r["run1"]["stopped_at_step"] or 0) + 1})]  # not the first step of a run
    r.update(steps_per_s=_g(1.0 / timed["step_s"].median()), tokens_per_s=_g(timed["tokens_per_s"].median()),
             peak_mem_mb_run2=_g(summ.get("peak_mem_mb")), max_mem_mb_metrics=_g(m["mem_mb"].max()),
             loss_first_last=[_g(m["loss"].iloc[0]), _g(m["loss"].iloc[-1])],
             cca_auroc=_g((summ.get("eval") or {}).get("cca_auroc")))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # refused before any work: in this process
        rc3 = _cli(_pretrain_argv(c, corpus, out, n + 10) + ["--resume"])
    r["resume_larger_max_steps"] = {"exit_code": rc3, "refused": rc3 != 0 and "max_steps" in err.getvalue(),
                                    "message": _tail(err.getvalue(), 2, 400)}
    r["ok"] = bool(rc1 == 128 + signal.SIGUSR1 and (r["run1"]["stopped_at_step"] or n) < n
                   and r["run2"]["exit_code"] == 0 and r["metrics_steps_once"]
                   and r["resume_larger_max_steps"]["refused"])
    _drop_big_files(out)
    return r


def dist_worker(args) -> None:
    """Under torchrun: an all-reduce of 16 MB and a barrier with the given backend; rank 0 writes the result."""
    import torch
    import torch.distributed as dist

    cuda = args.dist_backend == "nccl"
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    t = time.time()
    dist.init_process_group(args.dist_backend)
    world = dist.get_world_size()
    x = torch.full((1 << 22,), float(dist.get_rank() + 1), device=dev)
    dist.all_reduce(x)
    dist.barrier()
    res = {"ok": bool(torch.all(x == world * (world + 1) / 2)), "backend": args.dist_backend, "world_size": world,
           "device": str(dev), "seconds": round(time.time() - t, 2)}
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(res))
    dist.destroy_process_group()


def part_torchrun(c: Ctx) -> dict:
    res_file = c.work / "dist_worker.json"
    c.run([c.py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", Path(__file__).resolve(),
           "--dist-worker", "--dist-backend", "gloo" if c.smoke else "nccl", "--result", res_file],
          what="torchrun all-reduce")
    r = {"collective": json.loads(res_file.read_text())}
    if c.smoke:
        r["pretrain_launch"] = {"skipped": "cpu-smoke: ~20 s of start-up on 2 shared cores (it ran on CPU when "
                                           "this check was written); runs on CUDA"}
        r["ok"] = r["collective"]["ok"]
        return r
    corpus, out, steps = _corpus(c), c.work / "torchrun_pretrain", 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, MASTER_ADDR="127.0.0.1")
    t0 = time.time()
    rc = c.run([c.py, "-m", "epiflow", "pretrain-launch", "--nproc-per-node", "1", "--port", port, "--",
                *_pretrain_argv(c, corpus, out, steps)[1:]], env=env).returncode
    summ = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    r["pretrain_launch"] = {"exit_code": rc, "seconds": round(time.time() - t0, 1),
                            **{k: summ.get(k) for k in ("steps", "world_size", "device", "peak_mem_mb")},
                            "note": "a world of 1: epiflow.train.distributed.init starts no process group (no DDP); "
                                    "the collective above exercises the backend"}
    r["ok"] = bool(r["collective"]["ok"] and rc == 0 and summ.get("steps") == steps)
    _drop_big_files(out)
    return r


def part_tasks(c: Ctx) -> dict:
    import anndata as ad
    import numpy as np
    import pandas as pd
    import torch

    from epiflow.corpus.shard import open_corpus
    from epiflow.model import EpiAgentConfig, from_config, save_epiagent_checkpoint

    w = c.work / "tasks"
    shutil.rmtree(w, ignore_errors=True)
    sim, man = w / "sim", w / "sim" / "manifest.tsv"
    steps = [["simulate", "--preset", "test", "--out", sim],
             ["candidate-ccres", "--manifest", man, "--genome", "hg38", "--sources", sim / "ccre_sources.bed",
              "--out", w / "cand.bed"],
             *[["map-dataset", "--manifest", man, "--dataset", d, "--ccres", w / "cand.bed", "--genome", "hg38",
                "--no-build-check", "--out", w / f"{d}.h5ad"] for d in ("atlas_b1", "atlas_b2")],
             ["build-corpus", "--ccres", w / "cand.bed", "--mapped", w / "atlas_b1.h5ad", w / "atlas_b2.h5ad",
              "--min-cells-per-ccre", "5", "--min-ccres-per-cell", "20", "--out", w / "corpus"]]
    for s in steps:
        if _cli(s) != 0:
            raise RuntimeError(f"epiflow {s[0]} failed (see the log)")
    corpus = open_corpus(w / "corpus")
    torch.manual_seed(0)
    preset = "tiny" if c.smoke else "small"
    ckpt = save_epiagent_checkpoint(from_config(EpiAgentConfig.preset(preset, n_ccres=corpus.n_ccres)),
                                    w / "ckpt" / "checkpoint.pth", write_config=True)
    r = {"corpus": {"n_cells": corpus.n_cells, "n_ccres": corpus.n_ccres}, "model": preset, "device": c.dev}
    t0 = time.time()
    rc = _cli(["annotate", "--corpus", w / "corpus", "--checkpoint", ckpt, "--out", w / "ann", "--epochs", "1",
               "--device", c.dev, "--no-figures", "--no-baselines", *(["--max-steps", "2"] if c.smoke else [])])
    m = pd.read_csv(w / "ann" / "metrics.tsv", sep="\t").set_index("metric")["value"] if rc == 0 else {}
    r["annotate"] = {"exit_code": rc, "seconds": round(time.time() - t0, 1),
                     **{k: _g(m.get(k)) for k in ("accuracy", "macro_F1", "train_steps")}}
    t0 = time.time()
    emb = ["embed", "--checkpoint", ckpt, "--corpus", w / "corpus", "--no-progress"]
    rc_e = _cli([*emb, "--out", w / "emb.h5ad", "--device", c.dev])
    r["embed"] = {"exit_code": rc_e, "seconds": round(time.time() - t0, 1)}
    if rc_e == 0:
        x = np.asarray(ad.read_h5ad(w / "emb.h5ad").obsm["X_epiagent"], dtype=np.float64)
        r["embed"].update(shape=list(x.shape), finite=bool(np.isfinite(x).all()))
        if c.dev == "cuda" and _cli([*emb, "--out", w / "emb_cpu.h5ad", "--device", "cpu"]) == 0:
            r["embed"]["max_abs_vs_cpu"] = _g(np.abs(x - ad.read_h5ad(w / "emb_cpu.h5ad").obsm["X_epiagent"]).max(), 3)
    r["ok"] = rc == 0 and rc_e == 0 and r["embed"].get("finite", False)
    return r


def part_compile(c: Ctx) -> dict:
    """``epiflow pretrain --compile`` (each encoder block compiled; the varlen flash path in bf16) beside the
    same pretraining without it, on CUDA: the paper's encoder (``paper`` config: 18 blocks of 512) on a toy
    corpus with a small vocabulary (300 cells x 20,000 cCREs, ~2,000 accessible a cell, as real cells), 10
    steps: exit codes, wall seconds (the compile is in the first step) and the median step time after step
    2. On CPU the packed attention runs per sequence, where compile is refused (exit 2) before any work:
    that refusal is what the smoke run checks."""
    import pandas as pd

    from epiflow.train import toy

    w = c.work / "compile"
    shutil.rmtree(w, ignore_errors=True)
    if c.smoke:
        toy.write_toy_corpus(w / "corpus", n_cells=60, n_ccres=500, n_types=4, seed=0, shard_size=100)
    else:
        toy.write_toy_corpus(w / "corpus", n_cells=300, n_ccres=20_000, n_types=4, seed=0, shard_size=100,
                             counts_fn=toy.sparse_counts, median=2000.0)
    preset = "tiny" if c.smoke else "paper"
    base = ["pretrain", "--corpus", w / "corpus", "--model-config", preset, "--max-steps", "3" if c.smoke else "10",
            "--device", c.dev, "--ckpt-every", "0", "--no-progress"]
    if c.smoke:
        rc = _cli([*base, "--out", w / "pre_compiled", "--compile"])
        return {"refused_on_cpu": rc == 2, "exit_code": rc, "ok": rc == 2}
    r = {"model": preset, "backend": "auto (packed)"}
    from epiflow.model.attention import per_sequence_forced

    if per_sequence_forced():  # packed_fallback: compile is refused over the per-sequence loop; sdpa compiles
        base += ["--backend", "sdpa"]
        r["backend"] = "sdpa (EPIFLOW_PACKED_PER_SEQUENCE=1: see packed_fallback)"
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out, t0 = w / f"pre_{name}", time.time()
        try:
            rc, err = _cli([*base, "--out", out, *extra]), None
        except Exception as exc:  # a compiler error: reported beside the eager run's figures
            rc, err = None, _exc_text(exc)
        r[name] = {"exit_code": rc, "seconds": round(time.time() - t0, 1), **({"error": err} if err else {})}
        if rc == 0:
            m = pd.read_csv(out / "metrics.csv")
            r[name].update(first_step_s=_g(m["step_s"].iloc[0]), median_step_s=_g(m["step_s"].iloc[2:].median()),
                           last_loss=_g(m["loss"].iloc[-1]))
        c.partial(r)
    if r["eager"].get("median_step_s") and r["compiled"].get("median_step_s"):
        r["compiled_over_eager_speed"] = round(r["eager"]["median_step_s"] / r["compiled"]["median_step_s"], 2)
    r["ok"] = r["eager"]["exit_code"] == 0 and r["compiled"]["exit_code"] == 0
    return r


def child(args) -> int:
    import torch

    if not args.cpu_smoke and args.part != "env" and not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device (use --cpu-smoke on a machine without a GPU)")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the verbs print tables; the result goes to a file
            res = globals()[f"part_{args.part}"](Ctx(args))
    except Skip as exc:
        res = {"skipped": str(exc)}
    Path(args.result).write_text(json.dumps(res, default=str))
    return 0


# =============================================================================================== driver
def _run_group(cmd, timeout: float, log_path: Path, env: dict) -> tuple[int | None, bool]:
    """Run ``cmd`` in its own process group; on timeout SIGTERM, then SIGKILL, the whole group. Whatever the
    part left running (e.g. a benchmark's child after an inner timeout) is killed when it returns."""
    with open(log_path, "w") as fh:
        p = subprocess.Popen([str(x) for x in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                             start_new_session=True)
        timed_out = False
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=30)
        return p.returncode, timed_out


def packed_fallback(golden: dict) -> str | None:
    """Why the parts after ``golden`` run the packed backend's per-sequence loop
    (``EPIFLOW_PACKED_PER_SEQUENCE=1``), or None. The varlen flash kernel (one call per batch, CUDA bf16) has
    not run on a GPU before this check: if golden's ``packed_kernel`` check finds that it raises or disagrees
    with the loop, or a packed bf16 golden run raises, every later part would fail on it (pretraining, the
    tasks and the benchmarks all use it) and the session's GPU time would measure nothing else."""
    pk = golden.get("packed_kernel")
    if isinstance(pk, dict) and pk.get("ok") is False and pk.get("kernel") != "per-sequence":
        return "golden packed_kernel check failed: " + (pk.get("error") or "the kernel disagrees with the "
                                                        "per-sequence loop (see parts.golden.packed_kernel)")
    raised = [k for k, r in (golden.get("runs") or {}).items() if "/packed/bf16" in k and r.get("error")]
    if raised:
        return f"golden run {raised[0]} raised: {golden['runs'][raised[0]]['error']}"
    err = str(golden.get("error") or "")  # the part's process died (a CUDA fault): its traceback's tail
    if golden.get("ok") is False and ("_flash_attention" in err or "attention_packed" in err):
        return "the golden part died in the packed kernel: " + err.strip().splitlines()[-1][:300]
    return None


def goals(parts: dict, smoke: bool, total_s: float) -> dict:
    gold, bm, bt, pc = (parts.get(k, {}) for k in ("golden", "bench_model", "bench_train", "pretrain_cli"))
    mfu = (((bm.get("long_L") or {}).get("variants") or {}).get("packed") or {}).get("mfu")
    lean, lean_ck = bt.get("lean") or {}, bt.get("lean+ckpt") or {}
    gpu_only = "measured at paper sizes on CUDA only" if smoke else None

    def goal(text, value, ok, note=None):
        return {"goal": text, "value": value, "pass": ok, **({"note": note} if note else {})}

    def cmp(v, ok):
        return None if smoke or v is None else bool(ok(v))

    one = bt.get("lean+ckpt_one_cell") or {}
    peak, state, peak_ck, peak_one = (None,) * 4 if smoke else (lean.get("peak_gb"), lean.get("state_gb"),
                                                                 lean_ck.get("peak_gb"), one.get("peak_gb"))
    expected = (bt.get("expected_peak_gb") or {}).get("lean+ckpt")
    return {
        "golden_fp32": goal(f"every fixture output within atol = rtol = {FP32_TOL:g}, every backend (fp32)",
                            gold.get("fp32_failures"), gold.get("fp32_ok")),
        "golden_bf16": goal(f"every fixture output within atol = rtol = {BF16_TOL:g}, every backend (bf16 autocast)",
                            gold.get("bf16_failures"), gold.get("bf16_ok")),
        "packed_kernel": goal("the packed kernel (CUDA: one varlen flash call, dropout included) agrees with one SDPA "
                              "call per sequence: output and gradients without dropout (bf16 tolerance), the "
                              "dropout rate and its mean", (gold.get("packed_kernel") or {}).get("kernel"),
                              (gold.get("packed_kernel") or {}).get("ok")),
        "packed_bf16_mfu_L8192": goal(f">= {MFU_TARGET:.0%} of the GPU's bf16 dense peak (packed, L = 8,192)",
                                      None if smoke else mfu, cmp(mfu, lambda v: v >= MFU_TARGET), gpu_only),
        "lean_peak_gb_per_gpu": goal(f"<= {LEAN_TARGET_GB} GB (analytic lean state {LEAN_STATE_GB} GB)", peak,
                                     cmp(peak, lambda v: v <= LEAN_TARGET_GB), gpu_only or "max_memory_allocated: "
                                     "includes activations, which the analytic figure leaves out"),
        "lean_ckpt_peak_gb_per_gpu": goal(f"<= {LEAN_TARGET_GB} GB with activation checkpointing (memory-lean)",
                                          peak_ck, cmp(peak_ck, lambda v: v <= LEAN_TARGET_GB), gpu_only or
                                          f"max_memory_allocated; analytic expectation {expected} GB (state + "
                                          "checkpointed encoder activations; heads and gradients in flight left out)"),
        "lean_ckpt_one_cell_peak_gb_per_gpu": goal(
            f"<= {LEAN_TARGET_GB} GB with activation checkpointing and one cell per micro-batch "
            f"(--batch-tokens {ONE_CELL_BATCH_TOKENS[False]} --grad-accum 4 --rlm-separate)", peak_one,
            cmp(peak_one, lambda v: v <= LEAN_TARGET_GB), gpu_only or
            f"max_memory_allocated; analytic expectation {one.get('expected_peak_gb')} GB (as above)"),
        "lean_state_gb_per_gpu": goal(f"<= {LEAN_TARGET_GB} GB (weights, gradients, optimiser, lean records)", state,
                                      cmp(state, lambda v: v <= LEAN_TARGET_GB), gpu_only),
        "pretrain_stop_resume": goal("SIGUSR1 stop + --resume: metrics.csv has every step once",
                                     pc.get("metrics_steps_once"), pc.get("ok")),
        "total_time_s": goal(f"<= {TOTAL_TARGET_S} s on one H100/H200", round(total_s, 1),
                             cmp(total_s, lambda v: v <= TOTAL_TARGET_S)),
    }


def _install(args) -> dict:
    """bash scripts/setup_env.sh (needs PyPI), then run this script again with .venv/bin/python."""
    t = time.time()
    try:
        r = subprocess.run(["bash", ROOT / "scripts" / "setup_env.sh"], cwd=ROOT, capture_output=True, text=True,
                           timeout=args.install_timeout)
        res = {"ok": r.returncode == 0, "error": _tail(r.stderr or r.stdout) if r.returncode else None}
    except subprocess.TimeoutExpired:
        res = {"ok": False, "error": f"setup_env.sh timed out after {args.install_timeout:g} s"}
    res["seconds"] = round(time.time() - t, 1)
    venv = ROOT / ".venv" / "bin" / "python"
    if res["ok"] and venv.exists():
        os.environ["GPU_CHECK_INSTALL"] = json.dumps(res)
        os.execv(venv, [str(venv), str(Path(__file__).resolve()), *[a for a in sys.argv[1:] if a != "--install"]])
    return dict(res, note=f"continuing with {sys.executable}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/gpu_check", help="folder of gpu_check.json and gpu_check.log")
    ap.add_argument("--cpu-smoke", action="store_true", help="every part on CPU, tiny sizes (no CUDA needed)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of parts to run (default: all)")
    ap.add_argument("--budget", type=float, default=500, help="seconds for all parts: a part gets at most what is "
                    "left, and one with under 20 s left is skipped (run the command under `timeout 540`)")
    ap.add_argument("--fixtures", help="golden fixtures (default $EPIFLOW_SHARED/fixtures, ../shared/fixtures)")
    ap.add_argument("--workdir", help="scratch folder (default: a new temporary folder, removed at the end)")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    ap.add_argument("--try-flash-attn", action="store_true", help="env: pip install flash-attn if it does not import")
    ap.add_argument("--flash-attn-timeout", type=float, default=120)
    ap.add_argument("--install", action="store_true", help="bash scripts/setup_env.sh first (PyPI), then use .venv")
    ap.add_argument("--install-timeout", type=float, default=900)
    for hidden in ("--part", "--result", "--deadline", "--dist-backend"):
        ap.add_argument(hidden, type=float if hidden == "--deadline" else str, help=argparse.SUPPRESS)
    ap.add_argument("--dist-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dist_worker:
        dist_worker(args)
        return 0
    if args.part:
        return child(args)
    selected = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(selected) - set(PARTS):
        ap.error(f"unknown part(s) {sorted(set(selected) - set(PARTS))}; choose from {', '.join(PARTS)}")
    install = _install(args) if args.install else json.loads(os.environ.pop("GPU_CHECK_INSTALL", "null"))
    t_start, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.workdir:
        work, where = Path(args.workdir), "--workdir"
    else:
        parent, where = scratch_parent(args.cpu_smoke)
        work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=parent))
    work.mkdir(parents=True, exist_ok=True)
    # TMPDIR: bench_train's own temporary folders (its corpus, states and checkpoints) go there too
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", MPLCONFIGDIR=str(work / "mpl"), TMPDIR=str(work),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    report = {"check": "epiflow benchmarks/gpu_check.py (issue #20)", "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "host": socket.gethostname(), "python": sys.executable, "install": install, "budget_s": args.budget,
              "scratch": f"{work}: {where}", "parts": {}}
    log = open(out / "gpu_check.log", "w")
    log.write(f"gpu_check {' '.join(sys.argv[1:])}\n{report['date']} {sys.executable}, scratch {work}\n")
    for name in PARTS:
        left = args.budget - (time.time() - t_start)
        if name not in selected or left < 20:
            res = {"skipped": "not in --parts" if name not in selected else f"time budget of {args.budget:g} s spent"}
        else:
            timeout = min((120 if args.cpu_smoke else TIMEOUT_S[name])
                          + (args.flash_attn_timeout if name == "env" and args.try_flash_attn else 0), left)
            result = work / f"{name}.result.json"
            result.unlink(missing_ok=True)
            cmd = [sys.executable, Path(__file__).resolve(), "--part", name, "--workdir", work, "--result", result,
                   "--deadline", time.time() + timeout, *(["--cpu-smoke"] if args.cpu_smoke else []),
                   *(["--fixtures", args.fixtures] if args.fixtures else []),
                   *(["--try-flash-attn", "--flash-attn-timeout", args.flash_attn_timeout]
                     if args.try_flash_attn else [])]
            print(f"[gpu_check] {name} (timeout {timeout:.0f} s) ...", file=sys.stderr, flush=True)
            t0 = time.time()
            rc, timed_out = _run_group(cmd, timeout, work / f"{name}.log", env)
            text = (work / f"{name}.log").read_text(errors="replace")
            if rc == 0 and result.exists():
                res = json.loads(result.read_text())
            else:
                why = f"timed out after {timeout:.0f} s" if timed_out else f"exit code {rc}"
                res = {"ok": False, "error": f"{why}: {_tail(text)}"}
                if result.exists():  # what the part had measured before it died or ran out of time
                    res = {**json.loads(result.read_text()), **res}
            res["seconds"] = round(time.time() - t0, 1)
            log.write(f"\n===== {name}: {' '.join(map(str, cmd))}\n" + "\n".join(text.splitlines()[-400:])
                      + f"\n----- {name}: {json.dumps(res)}\n")
            log.flush()
            state = "skipped" if "skipped" in res else "ok" if res.get("ok") else "FAILED"
            print(f"[gpu_check] {name}: {state} in {res['seconds']} s", file=sys.stderr, flush=True)
            why = packed_fallback(res) if name == "golden" else None
            if why and env.get("EPIFLOW_PACKED_PER_SEQUENCE") != "1":
                env["EPIFLOW_PACKED_PER_SEQUENCE"] = "1"
                report["packed_fallback"] = {"env": "EPIFLOW_PACKED_PER_SEQUENCE=1", "from_part": "golden",
                                             "why": why}
                log.write(f"\n===== the parts after golden run with EPIFLOW_PACKED_PER_SEQUENCE=1: {why}\n")
                print("[gpu_check] the packed varlen kernel failed: the later parts run the per-sequence loop",
                      file=sys.stderr, flush=True)
        report["parts"][name] = res
        report["total_s"] = round(time.time() - t_start, 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    report["goals"] = goals(report["parts"], args.cpu_smoke, time.time() - t_start)
    text = json.dumps(report, indent=1, default=str)
    (out / "gpu_check.json").write_text(text)
    log.write(f"\n===== goals\n{json.dumps(report['goals'], indent=1)}\n")
    log.close()
    if not (args.workdir or args.keep_work):
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    return 1 if any(p.get("ok") is False for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
