"""Per-step metrics: CSV (always), TensorBoard (optional), loss-curve figure."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import atomic_path

log = logging.getLogger(__name__)

COLUMNS = ["step", "epoch", "k", "rlm", "loss", "sr", "cca", "rlm_loss", "lr", "grad_norm", "cells",
           "tokens", "tokens_per_s", "step_s", "mem_mb"]


class MetricsLogger:
    """Appends one CSV row per step (rank 0 only). On resume, rows after the resumed step are dropped
    so the file equals that of an uninterrupted run (apart from timings)."""

    def __init__(self, out_dir, enabled: bool = True, tensorboard: bool = False, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        rows = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, COLUMNS)
                w.writeheader()
                w.writerows(rows)
        self._fh = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._fh, COLUMNS)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the 'tensorboard' package", field="tensorboard",
                                  fix="pip install 'epiflow[tensorboard]' (or pip install tensorboard)") from None
            self.tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._w.writerow({k: row.get(k, "") for k in COLUMNS})
        self._fh.flush()
        if self.tb is not None:
            step = int(row["step"])
            for k in ("loss", "sr", "cca", "rlm_loss", "lr", "grad_norm", "tokens_per_s", "mem_mb"):
                v = row.get(k)
                if v not in (None, ""):
                    self.tb.add_scalar(f"train/{k}", float(v), step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(metrics_csv, out_png) -> Path | None:
    """Loss curves (total and each objective, log scale) from ``metrics.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(metrics_csv)
    if df.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for col, label in (("loss", "total"), ("sr", "SR"), ("cca", "CCA"), ("rlm_loss", "RLM")):
        if col in df and df[col].notna().any() and (df[col].fillna(0) != 0).any():
            s = df[col].astype(float)
            axes[0].plot(df["step"], s, lw=0.8, alpha=0.35)
            axes[0].plot(df["step"], s.rolling(max(1, len(s) // 50), min_periods=1).mean(), lw=1.5,
                         label=label, color=axes[0].lines[-1].get_color())
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[0].legend(frameon=False)
    axes[0].set_title("pretraining losses")
    axes[1].plot(df["step"], df["lr"], color="k", lw=1)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("learning rate")
    axes[1].set_title("schedule (K: " + ",".join(str(k) for k in sorted(df["k"].unique())) + ")")
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out_png


def peak_memory_mb(device) -> float:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except Exception:  # pragma: no cover
        return float("nan")


class StepProfiler:
    """Profile a range of pretraining steps with ``torch.profiler`` (a measuring aid, off by default).

    ``EPIFLOW_PROFILE_STEPS=A:B`` profiles steps A..B (1-based, inclusive; ``A`` alone: one step) and
    writes the op table (sorted by self device time on CUDA, self CPU time otherwise) to
    ``EPIFLOW_PROFILE_OUT`` (default ``<out>/profile_steps.txt``) when step B ends. Only the main
    process profiles. The table says where a whole step's time goes: forward, backward, the optimiser
    and the lean tables' updates, data movement, host synchronisation.
    """

    def __init__(self, out_dir, is_main: bool = True, device=None):
        spec = os.environ.get("EPIFLOW_PROFILE_STEPS", "").strip()
        self.first: int | None = None
        self.last: int | None = None
        self._prof: Any = None
        self.device = device
        if not spec or not is_main:
            return
        try:
            a, _, b = spec.partition(":")
            self.first, self.last = int(a), int(b or a)
        except ValueError:
            raise ConfigError(f"EPIFLOW_PROFILE_STEPS={spec!r} is not A:B (step numbers)",
                              field="EPIFLOW_PROFILE_STEPS", fix="e.g. EPIFLOW_PROFILE_STEPS=20:22") from None
        if self.first < 1 or self.last < self.first:
            raise ConfigError(f"EPIFLOW_PROFILE_STEPS={spec!r}: need 1 <= A <= B", field="EPIFLOW_PROFILE_STEPS",
                              fix="e.g. EPIFLOW_PROFILE_STEPS=20:22")
        self.path = Path(os.environ.get("EPIFLOW_PROFILE_OUT") or Path(out_dir) / "profile_steps.txt")

    def before(self, step: int) -> None:
        """Call before running step ``step`` (1-based)."""
        if self.first is None or step != self.first or self._prof is not None:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU]
        if torch.cuda.is_available() and (self.device is None or torch.device(self.device).type == "cuda"):
            acts.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=acts)
        self._prof.__enter__()

    def after(self, step: int, *, final: bool = False) -> None:
        """Call after step ``step`` ended; writes the table after the last profiled step (or, with
        ``final``, at the end of a run that stopped before it: the table then says so)."""
        if self._prof is None or self.last is None or (step < self.last and not final):
            return
        self.last = min(self.last, step)
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        events = prof.key_averages()  # once: slow on the traces of large steps
        cuda = any(getattr(e, "self_device_time_total", 0) for e in events)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = events.table(sort_by=key, row_limit=40, max_name_column_width=70)
        # host work: every operator call is a dispatch, on a GPU mostly a kernel launch
        aten = [e for e in events if e.key.startswith("aten::")]
        calls = sum(e.count for e in aten)
        per_step = calls / max(self.last - (self.first or 1) + 1, 1)
        from ..io import atomic_write_text

        # the host's view: the operators called most often
        by_count = sorted(aten, key=lambda e: -e.count)[:25]
        width = max([len(e.key) for e in by_count] + [8])
        counts = "\n".join(f"{e.key:<{width}}  {e.count:>9}  {e.count / max(calls, 1):7.1%}" for e in by_count)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, f"# steps {self.first}..{self.last}, sorted by {key}; aten operator calls: "
                                     f"{calls} ({per_step:.0f} per step)\n{table}\n\n"
                                     f"# the aten operators called most often (calls in steps {self.first}.."
                                     f"{self.last}, share of all calls)\n{counts}\n")
