"""Figures of the perturbation tasks (``predict-stimulation``, ``predict-genetic``): real vs predicted
mean accessibility (``scatter.png``) and direction accuracy by k (``direction.png``), drawn from what
:func:`epiflow.tasks.perturbation.run_stimulation` / ``run_genetic`` return."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import atomic_path
from ..metrics.perturbation import DEFAULT_KS, r2_linear


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, svg: bool) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    if svg:
        with atomic_path(path.with_suffix(".svg")) as tmp:
            fig.savefig(tmp, format="svg")


def plot_scatter(frames: dict[str, pd.DataFrame], path: str | os.PathLike, *, n_top: int = 1000,
                 svg: bool = False) -> Path | None:
    """Real vs predicted mean accessibility, one row per group, one column per method (``frames``: group
    -> the per-cCRE frame of :func:`epiflow.tasks.perturbation.evaluate_group`). None without groups."""
    if not frames:
        return None
    path = Path(path)
    groups = list(frames)
    methods = [c[5:] for c in frames[groups[0]].columns if c.startswith("pred_")]
    fig = _figure(3.2 * len(methods), 3.0 * len(groups))
    axes = fig.subplots(len(groups), len(methods), squeeze=False)
    for i, g in enumerate(groups):
        f = frames[g]
        top = f["top_da"].to_numpy()
        for j, m in enumerate(methods):
            ax = axes[i, j]
            x, y = f["real_perturbed"].to_numpy(), f[f"pred_{m}"].to_numpy()
            ax.scatter(x[~top], y[~top], s=2, c="0.7", alpha=0.5, rasterized=True, label="all cCREs")
            ax.scatter(x[top], y[top], s=3, c="tab:red", alpha=0.7, rasterized=True, label=f"top-{n_top} DA")
            ax.set_title(f"{g}: {m}\nR²={r2_linear(x, y):.3f} (top {r2_linear(x[top], y[top]):.3f})", fontsize=8)
            ax.set_xlabel("real mean accessibility", fontsize=7)
            ax.set_ylabel("predicted", fontsize=7)
            ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    _save(fig, path, svg)
    return path


def plot_direction(table: pd.DataFrame, path: str | os.PathLike, *, ks=DEFAULT_KS,
                   svg: bool = False) -> Path | None:
    """Direction accuracy (mean over groups) by k, methods side by side (``table``: the long metrics).
    None when the table has no direction accuracy."""
    t = table[table["metric"].isin([f"dir_acc@{k}" for k in ks])]
    if t.empty:
        return None
    path = Path(path)
    methods = list(dict.fromkeys(t["method"]))
    fig = _figure(1.2 + 1.1 * len(ks), 3.2)
    ax = fig.subplots()
    w = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        vals = [float(t[(t["method"] == m) & (t["metric"] == f"dir_acc@{k}")]["value"].mean()) for k in ks]
        ax.bar(np.arange(len(ks)) + (i - (len(methods) - 1) / 2) * w, vals, w, label=m)
    ax.axhline(0.5, color="0.5", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(ks)), [f"top {k}" for k in ks])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("direction accuracy (up + down DA)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path, svg)
    return path


def perturbation_figures(result, out: str | os.PathLike, *, n_top: int = 1000, ks=DEFAULT_KS,
                         svg: bool = False) -> list[Path]:
    """``scatter.png`` and ``direction.png`` of a perturbation task's result in ``out``."""
    out = Path(out)
    drawn = [plot_scatter(result.data.get("frames") or {}, out / "scatter.png", n_top=n_top, svg=svg),
             plot_direction(result.metrics, out / "direction.png", ks=ks, svg=svg)]
    return [p for p in drawn if p is not None]
