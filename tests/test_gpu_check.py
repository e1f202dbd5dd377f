"""benchmarks/gpu_check.py (issue #20): the prepared GPU check, run on CPU (--cpu-smoke), its error handling
and its helpers. The GPU figures themselves need a GPU machine (benchmarks/README.md, "GPU check")."""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = ["env", "golden", "tasks", "torchrun", "bench_model", "pretrain_cli", "bench_train", "compile"]
GOALS = {"golden_fp32", "golden_bf16", "packed_bf16_mfu_L8192", "lean_peak_gb_per_gpu", "lean_ckpt_peak_gb_per_gpu",
         "lean_ckpt_one_cell_peak_gb_per_gpu", "lean_state_gb_per_gpu", "pretrain_stop_resume", "total_time_s",
         "packed_kernel"}


def _script(name: str):
    """A fresh module of benchmarks/<name>.py."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _gpu_check():
    return _script("gpu_check")


def _run(args, tmp_path, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def test_analytic_lean_state_is_the_estimates():
    """The goal text's analytic lean state is memory_estimate's (paper config, the CUDA chunk sizes)."""
    from epiflow.model import EpiAgentConfig
    from epiflow.train.lean import memory_estimate

    est = memory_estimate(EpiAgentConfig.preset("paper"))["lean"]["total"] / 1e9
    g = _gpu_check()
    assert g.LEAN_STATE_GB == round(est, 2) and g.LEAN_STATE_GB <= g.LEAN_TARGET_GB


def test_scratch_goes_to_shm_only_with_room(tmp_path, monkeypatch):
    """The default scratch folder is RAM-backed /dev/shm (fast checkpoint writes) only in GPU mode and
    with SHM_MIN_FREE_GB free, else the temporary folder; the reason is reported."""
    import collections

    g = _gpu_check()
    usage = collections.namedtuple("usage", "total used free")
    assert g.scratch_parent(True, tmp_path)[0] is None
    assert g.scratch_parent(False, tmp_path / "missing") == (None, f"temporary folder ({tmp_path / 'missing'} not found)")
    monkeypatch.setattr(g.shutil, "disk_usage", lambda p: usage(0, 0, (g.SHM_MIN_FREE_GB + 1) * 1e9))
    where, why = g.scratch_parent(False, tmp_path)
    assert where == str(tmp_path) and "RAM-backed" in why
    monkeypatch.setattr(g.shutil, "disk_usage", lambda p: usage(0, 0, 10e9))
    where, why = g.scratch_parent(False, tmp_path)
    assert where is None and "10 GB free" in why


def test_peak_table_and_json_parsing():
    g = _gpu_check()
    assert g.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and g.peak_tflops("NVIDIA H200") == 989.0
    assert g.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and g.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert g.peak_tflops("NVIDIA H100 NVL") is None and g.peak_tflops("Tesla T4") is None
    assert g.peak_tflops(None) is None
    assert g._last_json('log line\n{\n "a": {"b": 1}\n}\n') == {"a": {"b": 1}}
    with pytest.raises(ValueError):
        g._last_json("no json here")
    # a check inside a part fails alone, as an entry
    assert g._guarded(lambda x: {"ok": True, "x": x}, 3) == {"ok": True, "x": 3}
    failed = g._guarded(lambda: 1 / 0)
    assert failed["ok"] is False and failed["error"].startswith("ZeroDivisionError")
    goals = g.goals({}, smoke=False, total_s=500.0)
    assert set(goals) == GOALS and goals["total_time_s"]["pass"] is False
    assert all(goals[k]["pass"] is None for k in GOALS - {"total_time_s"})  # nothing measured: null, not fail


@pytest.mark.parametrize("rate, ok", [(1.0, True), (0.0, False), (3.0, False)])
def test_packed_kernel_check_catches_a_wrong_dropout(monkeypatch, rate, ok):
    """The golden part's check of the packed CUDA kernel, with a CPU stand-in for the kernel: one that
    applies the asked attention dropout passes; one that ignores it, or applies 3x the rate, fails."""
    import torch

    from epiflow.model import attention

    def fake_kernel(q, k, v, cu_q, cu_k, max_q, max_k, p, causal, debug):
        out = torch.empty_like(q)
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            w = torch.softmax(torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / q.shape[-1] ** 0.5, -1)
            w = torch.nn.functional.dropout(w, p * rate) if p * rate > 0 else w
            out[s:e] = torch.einsum("hqk,khd->qhd", w, v[s:e])
        return out, None, None, None, None

    monkeypatch.setattr(attention, "_flash_varlen_ok", lambda device, dtype: True)
    monkeypatch.setattr(attention, "_flash_varlen_op", lambda: fake_kernel)
    torch.manual_seed(0)
    r = _gpu_check().packed_kernel_check(torch.device("cpu"), smoke=True)
    assert r["kernel"] == "flash-varlen" and r["reference"] == "per-sequence"
    assert r["no_dropout"]["output"]["ok"] and r["no_dropout"]["grad_qkv"]["ok"]  # the same attention
    assert r["ok"] is ok and r["dropout"]["ok"] is ok


@pytest.mark.parametrize("golden, fallback", [
    ({"ok": True, "packed_kernel": {"ok": True, "kernel": "flash-varlen"}, "runs": {}}, None),
    ({"ok": True, "packed_kernel": {"ok": False, "error": "RuntimeError: no kernel image"}, "runs": {}},
     "RuntimeError: no kernel image"),
    ({"ok": True, "packed_kernel": {"ok": False, "kernel": "flash-varlen"}, "runs": {}}, "disagrees"),
    ({"ok": True, "packed_kernel": {"ok": True, "kernel": "flash-varlen"},
      "runs": {"epiagent_tiny/sdpa/bf16": {"ok": True}, "epiagent_tiny/packed/bf16": {"ok": False, "error": "boom"}}},
     "epiagent_tiny/packed/bf16 raised: boom"),
    ({"ok": True, "packed_kernel": {"ok": False, "kernel": "per-sequence"}, "runs": {}}, None),  # CPU: no other kernel
    ({"ok": False, "error": "exit code 1: no CUDA device"}, None),
    ({"ok": False, "error": 'exit code 1: Traceback\n  File "attention.py", line 199, in attention_packed\n'
                            "torch.AcceleratorError: CUDA error: an illegal memory access was encountered"},
     "died in the packed kernel: torch.AcceleratorError: CUDA error: an illegal memory access"),
])
def test_later_parts_fall_back_to_the_per_sequence_loop(tmp_path, monkeypatch, golden, fallback):
    """When golden finds the packed varlen kernel broken (raises, or disagrees with the per-sequence loop), the
    parts after it run with EPIFLOW_PACKED_PER_SEQUENCE=1, and the JSON says so and why; otherwise nothing
    changes. (Every later part uses the kernel: without this one broken kernel would cost the whole check.)"""
    gc = _gpu_check()
    seen = {}

    def fake_run_group(cmd, timeout, log_path, env):
        cmd = [str(x) for x in cmd]
        part = cmd[cmd.index("--part") + 1]
        seen[part] = env.get("EPIFLOW_PACKED_PER_SEQUENCE")
        Path(log_path).write_text(f"{part} ran\n")
        Path(cmd[cmd.index("--result") + 1]).write_text(json.dumps(golden if part == "golden" else {"ok": True}))
        return 0, False

    monkeypatch.setattr(gc, "_run_group", fake_run_group)
    monkeypatch.delenv("EPIFLOW_PACKED_PER_SEQUENCE", raising=False)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        gc.main(["--parts", "golden,tasks,bench_model", "--out", str(tmp_path / "out"),
                 "--workdir", str(tmp_path / "work")])
    report = json.loads(out.getvalue())
    assert seen["golden"] is None
    if fallback is None:
        assert seen["tasks"] is None and seen["bench_model"] is None and "packed_fallback" not in report
    else:
        assert seen["tasks"] == seen["bench_model"] == "1"
        fb = report["packed_fallback"]
        assert fb["env"] == "EPIFLOW_PACKED_PER_SEQUENCE=1" and fallback in fb["why"]
        assert "EPIFLOW_PACKED_PER_SEQUENCE=1" in (tmp_path / "out" / "gpu_check.log").read_text()
    assert "EPIFLOW_PACKED_PER_SEQUENCE" not in os.environ  # the check's own environment is left alone


def test_bench_model_variants_keep_the_callers_kernel_settings(monkeypatch):
    """bench_model's modifiers turn a kernel setting on; without one the caller's environment holds, so the
    fallback above reaches bench_model's 'packed' variant too; a variant whose kernel raises fails alone."""
    bm = _script("bench_model")
    seen = {}

    def fake_run_variant(args, model, cfg, cells, name, backend):
        seen[name] = (os.environ.get("EPIFLOW_PACKED_PER_SEQUENCE"), os.environ.get("EPIFLOW_SDPA_CUDNN"))
        if name == "sdpa+cudnn":
            raise RuntimeError("cuDNN graph failed")
        return {"variant": name, "tokens_per_s": 1.0}

    monkeypatch.setattr(bm, "run_variant", fake_run_variant)
    argv = ["--quick", "--config", "tiny", "--n-ccres", "2000", "--variant", "packed,packed+perseq,sdpa+cudnn,sdpa"]
    for caller, packed in ((None, None), ("1", "1")):
        if caller is None:
            monkeypatch.delenv("EPIFLOW_PACKED_PER_SEQUENCE", raising=False)
        else:
            monkeypatch.setenv("EPIFLOW_PACKED_PER_SEQUENCE", caller)
        monkeypatch.delenv("EPIFLOW_SDPA_CUDNN", raising=False)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert bm.main(argv) == 0
        lines = out.getvalue().strip().splitlines()  # one line per finished variant, the last complete
        assert len(lines) == 4 and [len(json.loads(x)) for x in lines] == [1, 2, 3, 4]
        res = {r["variant"]: r for r in json.loads(lines[-1])}
        assert seen["packed"] == (packed, None) and seen["packed+perseq"] == ("1", None)
        assert seen["sdpa+cudnn"] == (packed, "1") and seen["sdpa"] == (packed, None)
        assert res["sdpa+cudnn"]["error"] == "RuntimeError: cuDNN graph failed"
        assert res["sdpa"]["tokens_per_s"] == 1.0  # the variant after the failing one still ran


def test_bench_model_keeps_the_variants_that_finished_before_the_worker_died(monkeypatch):
    """On CUDA the variants share one worker process; if it dies (a CUDA fault) the parent keeps the variants
    it had reported and gives the others the exit code and the last line of stderr."""
    bm = _script("bench_model")
    first = [{"variant": "packed", "tokens_per_s": 5.0}]

    def died(cmd, **kw):
        return subprocess.CompletedProcess(cmd, -11, stdout=json.dumps(first) + "\n",
                                           stderr="Fatal Python error: Segmentation fault\n")

    monkeypatch.setattr(bm.subprocess, "run", died)
    monkeypatch.setattr(bm, "lengths_for", lambda args: np.array([100, 200]))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert bm.main(["--device", "cuda", "--quick", "--variants", "packed,packed+perseq,sdpa"]) == 0
    res = json.loads(out.getvalue())["results"]
    assert res["packed"] == first[0]
    assert res["packed+perseq"] == res["sdpa"] == {"error": "exit -11: Fatal Python error: Segmentation fault"}


@pytest.mark.parametrize("fallback", [False, True])
def test_compile_part_uses_sdpa_after_the_fallback(tmp_path, monkeypatch, fallback):
    """After packed_fallback the compile part runs both pretrainings with --backend sdpa (compile is refused over
    the per-sequence loop, sdpa compiles); otherwise with the default (packed) backend."""
    import argparse

    from epiflow.train import toy

    gc = _gpu_check()
    calls = []
    monkeypatch.setattr(toy, "write_toy_corpus", lambda *a, **k: None)
    monkeypatch.setattr(gc, "_cli", lambda argv: calls.append([str(a) for a in argv]) or 1)
    if fallback:
        monkeypatch.setenv("EPIFLOW_PACKED_PER_SEQUENCE", "1")
    else:
        monkeypatch.delenv("EPIFLOW_PACKED_PER_SEQUENCE", raising=False)
    c = gc.Ctx(argparse.Namespace(cpu_smoke=False, workdir=str(tmp_path), deadline=None, fixtures=None))
    r = gc.part_compile(c)
    assert len(calls) == 2 and calls[1][-1] == "--compile" and r["ok"] is False  # the stand-in runs exit 1
    assert all(("--backend" in a and a[a.index("--backend") + 1] == "sdpa") is fallback for a in calls)
    assert r["backend"].startswith("sdpa") is fallback


def test_a_part_that_dies_keeps_what_it_had_measured(tmp_path, monkeypatch):
    """A part reports its figures as it goes (Ctx.partial); if its process then dies or runs out of time the
    driver keeps them beside the error, marked partial (e.g. compile's eager run when the compiled one hangs)."""
    import argparse

    gc = _gpu_check()

    def fake_run_group(cmd, timeout, log_path, env):
        cmd = [str(x) for x in cmd]
        args = argparse.Namespace(cpu_smoke=False, workdir=cmd[cmd.index("--workdir") + 1], deadline=None,
                                  result=cmd[cmd.index("--result") + 1])
        gc.Ctx(args).partial({"eager": {"exit_code": 0, "median_step_s": 0.5}})
        Path(log_path).write_text("Traceback ...\nRuntimeError: CUDA error: unspecified launch failure\n")
        return -6, False

    monkeypatch.setattr(gc, "_run_group", fake_run_group)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        gc.main(["--parts", "compile", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")])
    part = json.loads(out.getvalue())["parts"]["compile"]
    assert part["partial"] is True and part["ok"] is False and part["eager"]["median_step_s"] == 0.5
    assert part["error"].startswith("exit code -6:") and "unspecified launch failure" in part["error"]


def test_a_golden_run_that_raises_fails_alone(tmp_path, monkeypatch):
    """A golden run that raises (e.g. the packed backend's kernel in bf16) is a failing run with its error; the
    other runs are still compared, and the part returns its figures (the fallback above reads them)."""
    import argparse

    import torch

    gc = _gpu_check()
    args = argparse.Namespace(cpu_smoke=True, workdir=str(tmp_path), deadline=None, fixtures=None)
    c = gc.Ctx(args)
    try:
        gc._fixtures_dir(c)
    except gc.Skip as exc:
        pytest.skip(str(exc))
    real = gc._golden_outputs

    def flaky(model, d, kind, dev):
        if model.backend == "packed" and torch.is_autocast_enabled("cpu"):
            raise RuntimeError("kernel failed")
        return real(model, d, kind, dev)

    monkeypatch.setattr(gc, "_golden_outputs", flaky)
    monkeypatch.setattr(gc, "packed_kernel_check", lambda dev, smoke: {"ok": True, "kernel": "per-sequence"})
    r = gc.part_golden(c)
    failed = sorted(k for k, v in r["runs"].items() if not v["ok"])
    assert failed == [f"{n}/packed/bf16" for n in ("epiagent_tiny", "epiagent_tiny_bc", "epiagent_tiny_supervised")]
    assert all("RuntimeError: kernel failed" in r["runs"][k]["error"] for k in failed)
    assert r["fp32_ok"] and not r["bf16_ok"] and r["bf16_failures"] == 3 and len(r["runs"]) == 12
    assert "epiagent_tiny/packed/bf16 raised" in gc.packed_fallback(r)


def test_gpu_mode_without_cuda_fails_into_json(tmp_path):
    """A part that fails (here: GPU mode on a machine without CUDA) becomes an error entry; the others run."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _run(["--parts", "golden", "--workdir", str(tmp_path / "work")], tmp_path, 300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert list(report["parts"]) == PARTS and report["mode"] == "gpu"
    golden = report["parts"]["golden"]
    assert golden["ok"] is False and "no CUDA device" in golden["error"] and golden["seconds"] > 0
    assert all(report["parts"][p] == {"skipped": "not in --parts"} for p in PARTS if p != "golden")
    assert report["goals"]["golden_fp32"]["pass"] is None
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == report
    assert "===== golden" in (tmp_path / "out" / "gpu_check.log").read_text()


def goals_pass(report, name):
    return report["goals"][name]["pass"]


@pytest.mark.slow
def test_cpu_smoke_every_part(tmp_path):
    """--cpu-smoke: every part runs on CPU with tiny sizes (60-130 s on 2 shared cores: mostly the start-up of
    the ~15 Python processes the parts run), one JSON object on stdout and in OUT/gpu_check.json."""
    proc = _run(["--cpu-smoke"], tmp_path, 900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["mode"] == "cpu-smoke" and list(report["parts"]) == PARTS
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == report
    assert (tmp_path / "out" / "gpu_check.log").stat().st_size > 0
    for name, part in report["parts"].items():
        assert part.get("ok") is not False, (name, part)
        assert part.get("ok") is True or "skipped" in part, (name, part)
    parts = report["parts"]
    assert parts["env"]["cuda_available"] is False and parts["env"]["torch"]
    if "skipped" not in parts["golden"]:  # the fixtures are in ../shared (skipped with a reason elsewhere)
        assert parts["golden"]["fp32_ok"] and parts["golden"]["bf16_ok"]
        assert set(parts["golden"]["backends"]) == {"sdpa", "packed"} and len(parts["golden"]["runs"]) == 12
        pk = parts["golden"]["packed_kernel"]  # on CPU both sides are the per-sequence kernel: it only runs
        assert pk["ok"] and pk["kernel"] == pk["reference"] == "per-sequence" and pk["dropout"]["grad_finite"]
        assert goals_pass(report, "packed_kernel") is True
    for key, variants in (("realistic", {"sdpa", "packed", "packed+perseq"}),
                          ("long_L", {"packed", "packed+perseq", "packed+nodrop"})):
        got = parts["bench_model"][key]["variants"]
        assert set(got) == variants and all(v["tokens_per_s"] > 0 for v in got.values())
    for v in parts["bench_model"]["long_L"]["variants"].values():  # the step's time by kernel class
        b = v["breakdown"]
        assert set(b["ms"]) == {"attention", "matmul", "other"} and b["total_ms"] > 0
        assert b["total_ms"] == pytest.approx(sum(b["ms"].values()), abs=0.05) and 0 < b["flops_share_attention"] < 1
    bt = parts["bench_train"]
    assert bt["lean"]["state_gb"] <= bt["dense"]["state_gb"]
    # the checkpointed lean run: same training state, fewer activations kept (analytic), it ran
    assert bt["lean+ckpt"]["checkpointing"] is True and bt["lean"]["checkpointing"] is False
    assert bt["lean+ckpt"]["tokens_per_s"] > 0 and bt["lean+ckpt"]["state_gb"] == bt["lean"]["state_gb"]
    assert bt["encoder_activations_gb"]["ckpt"] < bt["encoder_activations_gb"]["no_ckpt"]
    assert bt["expected_peak_gb"]["lean+ckpt"] < bt["expected_peak_gb"]["lean"]  # the same state estimate
    assert set(bt["lean_ckpt_over_lean"]) == {"peak", "tokens_per_s"}
    # lean + checkpointing again with one cell per micro-batch: fewer tokens kept per forward
    one = bt["lean+ckpt_one_cell"]
    assert one["batch_tokens"] == 128 and one["grad_accum"] == 4 and one["tokens_per_s"] > 0 and one["state_gb"] > 0
    assert one["encoder_activations_gb"] < bt["encoder_activations_gb"]["ckpt"]
    pc = parts["pretrain_cli"]
    assert pc["run1"]["exit_code"] == 138 and pc["run1"]["stopped_at_step"] < pc["max_steps"]
    assert pc["metrics_steps_once"] and pc["resume_larger_max_steps"]["refused"]
    assert parts["torchrun"]["collective"]["backend"] == "gloo" and "skipped" in parts["torchrun"]["pretrain_launch"]
    assert parts["tasks"]["embed"]["finite"] and parts["tasks"]["annotate"]["exit_code"] == 0
    assert parts["compile"] == {"refused_on_cpu": True, "exit_code": 2, "ok": True, "seconds": parts["compile"]["seconds"]}
    goals = report["goals"]
    assert set(goals) == GOALS and all({"goal", "value", "pass"} <= set(v) for v in goals.values())
    assert goals["pretrain_stop_resume"]["pass"] is True
    assert goals["packed_bf16_mfu_L8192"]["pass"] is None and goals["lean_peak_gb_per_gpu"]["pass"] is None
    assert goals["lean_ckpt_peak_gb_per_gpu"]["pass"] is None
    assert goals["lean_ckpt_one_cell_peak_gb_per_gpu"]["pass"] is None
