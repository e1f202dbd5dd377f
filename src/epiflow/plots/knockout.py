"""Figures of ``epiflow knockout``: the UMAP of the chimeric reference cells coloured by score with one
arrow per target (query cells with the target's cCREs added -> removed; a target is a cCRE, a gene's
promoter cCREs or the Group, labelled with its number of cCREs), and the bar chart of the mean effects
beside the random control (random single cCREs, and each target's size-matched random mean).

The axes helpers draw from the knockout's tables (``reference_cells.tsv``, ``shifts.tsv``,
``tss_ccres.tsv``); the paper panels fig5b-d (:mod:`epiflow.plots.figures`) use them too."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .embedding import _figure, save_figure

SCORE_CMAP = "coolwarm"


def reference_axes(ax, ref: pd.DataFrame, *, size: float = 6, alpha: float = 1.0, colorbar=None,
                   arrow: bool = False):
    """The reference cells (``umap1, umap2, score`` of ``reference_cells.tsv``) coloured by score.
    ``colorbar``: the figure to add the score colour bar to. ``arrow``: one arrow from the mean position
    of the cells scored < 0.25 to that of the cells scored > 0.75 (low -> high score)."""
    xy = ref[["umap1", "umap2"]].to_numpy(float)
    score = ref["score"].to_numpy(float)
    pts = ax.scatter(xy[:, 0], xy[:, 1], c=score, cmap=SCORE_CMAP, vmin=0.0, vmax=1.0, s=size, linewidths=0,
                     alpha=alpha, rasterized=True)
    if colorbar is not None:
        colorbar.colorbar(pts, ax=ax, label="cancerization score")
    low, high = score < 0.25, score > 0.75
    if arrow and low.any() and high.any():
        ax.annotate("", xy=xy[high].mean(0), xytext=xy[low].mean(0),
                    arrowprops=dict(arrowstyle="-|>", lw=2.0, color="black"))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    return pts


def n_ccres_of(tab: pd.DataFrame) -> np.ndarray:
    """The number of cCREs each row of a knockout table removes (1 for tables without ``n_ccres``, written
    before the gene unit)."""
    return tab["n_ccres"].to_numpy(int) if "n_ccres" in tab else np.ones(len(tab), int)


def target_labels(tab: pd.DataFrame) -> list[str]:
    """Figure labels of the targets of ``knockout.tsv`` rows: the name, with the number of cCREs when a
    target removes several (``VEGFA (3 cCREs)``)."""
    from ..tasks.knockout import target_label, target_name

    return [target_label(target_name(r), n) for (_, r), n in zip(tab.iterrows(), n_ccres_of(tab))]


def size_matched_marks(ax, tab: pd.DataFrame, *, size: float = 300) -> bool:
    """Over each target's bar (x = its row), the mean of its size-matched random knockouts
    (``random_mean_effect``), when some target removes several cCREs; True when drawn (else the random
    single cCREs are every target's control)."""
    if "random_mean_effect" not in tab or not (n_ccres_of(tab) > 1).any():
        return False
    ax.scatter(np.arange(len(tab)), tab["random_mean_effect"].to_numpy(float), marker="_", s=size, color="black",
               zorder=3, label="random knockouts of as many cCREs (mean)")
    ax.legend(fontsize=7, frameon=False)
    return True


def mean_shift(shifts: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Mean position of the query cells of ``shifts`` (one knockout's rows) with the target added and
    removed."""
    return (shifts[["umap1_added", "umap2_added"]].to_numpy(float).mean(0),
            shifts[["umap1_removed", "umap2_removed"]].to_numpy(float).mean(0))


def shift_arrow(ax, shifts: pd.DataFrame, label: str = "", *, lw: float = 1.5, color: str = "black") -> None:
    """One arrow: the mean position of the query cells with the target added -> removed (``label`` at its
    start)."""
    start, end = mean_shift(shifts)
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", lw=lw, color=color))
    if label:
        ax.text(start[0], start[1], label, fontsize=7)


def query_shift_axes(ax, shifts: pd.DataFrame) -> None:
    """Each query cell of one knockout (``shifts.tsv`` rows): its position with the target added (open
    circle) joined to that with it removed (filled), and the mean arrow."""
    a = shifts[["umap1_added", "umap2_added"]].to_numpy(float)
    r = shifts[["umap1_removed", "umap2_removed"]].to_numpy(float)
    for (x0, y0), (x1, y1) in zip(a, r):
        ax.plot([x0, x1], [y0, y1], color="#555555", lw=0.5, alpha=0.6)
    ax.scatter(a[:, 0], a[:, 1], s=14, facecolors="none", edgecolors="black", linewidths=0.6,
               label="query, target accessible")
    ax.scatter(r[:, 0], r[:, 1], s=14, color="black", linewidths=0, label="query, target knocked out")
    shift_arrow(ax, shifts, lw=2.0, color="#2ca02c")


def tss_accessibility_axes(ax, near: pd.DataFrame) -> None:
    """The cCREs around one gene's TSS (``tss_ccres.tsv`` rows): the fraction of accessible cells in
    each state at each cCRE's centre relative to the TSS (kb, upstream < 0), the promoter window
    shaded, the knockout targets starred."""
    mid = (near["rel_start"].to_numpy(float) + near["rel_end"].to_numpy(float)) / 2000.0
    fa, fb = near["fraction_a"].to_numpy(float), near["fraction_b"].to_numpy(float)
    sa, sb = str(near["state_a"].iloc[0]), str(near["state_b"].iloc[0])
    win, down = float(near["window"].iloc[0]), float(near["downstream"].iloc[0])
    ax.axvspan(-win / 1000.0, down / 1000.0, color="#f2e6b3", zorder=0, label="promoter window")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    dx = 0.08
    ax.vlines(mid - dx, 0, fa, color="#1f77b4", lw=2)
    ax.vlines(mid + dx, 0, fb, color="#d62728", lw=2)
    ax.scatter(mid - dx, fa, s=10, color="#1f77b4", label=sa)
    ax.scatter(mid + dx, fb, s=10, color="#d62728", label=sb)
    tgt = near["target"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
    if tgt.any():
        top = np.maximum(fa, fb)[tgt]
        ax.scatter(mid[tgt], top + 0.05, marker="*", s=60, color="black", label="knockout target")
    ax.set_xlabel("cCRE centre relative to the TSS (kb; upstream < 0)", fontsize=8)
    ax.set_ylabel("fraction of accessible cells", fontsize=8)
    ax.set_ylim(0, max(1e-3, float(np.max(np.concatenate([fa, fb]))) if len(fa) else 1.0) * 1.2 + 0.05)
    ax.spines[["top", "right"]].set_visible(False)


def knockout_figures(result, out: str | os.PathLike, *, title: str = "", seed: int = 0,
                     svg: bool = False) -> list[Path]:
    """``knockout_umap.png`` and ``knockout_effects.png`` in ``out`` from the
    :class:`~epiflow.tasks.common.TaskResult` of :func:`epiflow.tasks.knockout.run` (tables
    ``knockout``, ``reference_cells`` and ``shifts``; ``data`` ``random_effects``). Returns the paths
    written. (``seed`` is unused: the task computes the UMAP.)"""
    from ..tasks.knockout import target_label

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = result.data
    tab = result.tables["knockout"]
    shifts = result.tables["shifts"]
    nt = len(tab)
    fig = _figure(6.4, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    reference_axes(ax, result.tables["reference_cells"], colorbar=fig)
    for name, part in shifts.groupby("knockout", sort=False):
        shift_arrow(ax, part, target_label(name, n_ccres_of(part)[0]))
    ax.set_title(title or "in-silico knockout: query cells, target added -> removed", fontsize=9)
    written = save_figure(fig, out / "knockout_umap.png", svg=svg)

    fig = _figure(1.5 + 0.45 * (nt + 1), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    names = target_labels(tab) + ["random cCRE"]
    means = list(tab["mean_effect"]) + [float(np.mean(res["random_effects"]))]
    sds = list(tab["sd_effect"]) + [float(np.std(res["random_effects"]))]
    cols = ["#c0392b" if p < 0.05 else "#7f8c8d" for p in tab["p_value"]] + ["#bdc3c7"]
    ax.bar(range(len(means)), means, yerr=sds, color=cols, capsize=2)
    size_matched_marks(ax, tab, size=200)  # each target's own control, when some target has several cCREs
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(means)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("change of mean score (removed - added)")
    ax.set_title("knockout effects (red: p < 0.05 vs random of the same size)", fontsize=9)
    written += save_figure(fig, out / "knockout_effects.png", svg=svg)
    return written
