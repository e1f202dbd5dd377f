"""Figures of supervised annotation (``epiflow annotate``): the row-normalised confusion of EpiAgent and
the best LSI baseline on the query cells (``confusion.png``) and the true -> predicted flows of the
query cells (``sankey.png``), drawn from the :class:`~epiflow.tasks.common.TaskResult` of
:func:`epiflow.tasks.annotation.run`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .embedding import _figure, category_palette, save_figure

__all__ = ["annotation_figures", "confusion_figure", "sankey_axes", "sankey_figure"]


def annotation_figures(result, out: str | os.PathLike, *, svg: bool = False) -> list[Path]:
    """``confusion.png`` (EpiAgent and the LSI baseline of higher query accuracy) and ``sankey.png``
    (EpiAgent, query cells) of an annotation result, in the folder ``out``."""
    from ..metrics.classification import confusion_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pred = result.tables["predictions"]
    classes = list(result.data["classes"])
    ds_name = result.data["dataset"]
    q = pred[pred["split"] == "query"]
    yq = q["true"].to_numpy(dtype=str)
    tables = {"EpiAgent": result.tables["confusion"]}
    lsi_methods = [m for m in ("LSI+LogReg", "LSI+SVM") if f"pred_{m}" in pred.columns]
    if lsi_methods:
        met = result.metrics
        acc = met[met.metric == "accuracy"].set_index("method")["value"]
        best = max(lsi_methods, key=lambda m: acc[m])
        tables[best] = confusion_table(yq, q[f"pred_{best}"].to_numpy(dtype=str), labels=classes)
    written = confusion_figure(tables, out / "confusion.png", title=f"{ds_name}: query cells", svg=svg)
    written += sankey_figure(yq, q["pred_EpiAgent"].to_numpy(dtype=object), out / "sankey.png",
                             title=f"{ds_name}: EpiAgent, true -> predicted (query)", svg=svg)
    return written


def confusion_figure(tables: dict, path, *, title: str = "", svg: bool = False):
    """Row-normalised confusion heatmaps, one panel per method (``{method: confusion DataFrame}``)."""
    n = len(tables)
    k = max(len(t) for t in tables.values())
    side = max(3.2, 0.42 * k + 1.6)
    fig = _figure(side * n + 0.8, side)
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for ax, (method, tab) in zip(axes, tables.items()):
        m = tab.to_numpy(dtype=float)
        s = m.sum(axis=1, keepdims=True)
        frac = np.divide(m, s, out=np.zeros_like(m), where=s > 0)
        im = ax.imshow(frac, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(tab.shape[1]), tab.columns, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(tab.shape[0]), tab.index, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(method, fontsize=10)
        if k <= 15:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    if m[i, j]:
                        ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                                color="white" if frac[i, j] > 0.5 else "black")
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="fraction of true type")
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path, svg=svg)


def sankey_figure(y_true, y_pred, path, *, title: str = "", svg: bool = False, gap: float = 0.02):
    """True -> predicted flows drawn as smooth (cubic Bezier) bands between two stacked columns."""
    t = np.asarray(y_true).astype(str)
    p = np.asarray(y_pred).astype(str)
    fig = _figure(7.0, max(4.0, 0.35 * max(len(set(t)), len(set(p))) + 2))
    ax = fig.add_subplot(1, 1, 1)
    sankey_axes(ax, t, p, title=title, gap=gap)
    return save_figure(fig, path, svg=svg)


def sankey_axes(ax, y_true, y_pred, *, title: str = "", gap: float = 0.02, left_title: str = "true",
                right_title: str = "predicted") -> None:
    """Draw the true -> predicted flows of ``y_true`` / ``y_pred`` on ``ax`` (bands in the colour of the
    true class; the bands of correct predictions darker)."""
    from matplotlib.patches import Rectangle

    t = np.asarray(y_true).astype(str)
    p = np.asarray(y_pred).astype(str)
    left = sorted(set(t))
    right = sorted(set(p))
    pal = category_palette(sorted(set(left) | set(right)))
    n = max(len(t), 1)
    flows = pd.crosstab(pd.Series(t, name="t"), pd.Series(p, name="p")).reindex(index=left, columns=right,
                                                                               fill_value=0)
    scale = (1.0 - gap * (max(len(left), len(right)) - 1)) / n

    def stack(names, sizes):
        pos, y = {}, 1.0
        for nm, sz in zip(names, sizes):
            pos[nm] = (y - sz * scale, y)
            y -= sz * scale + gap
        return pos

    lpos = stack(left, flows.sum(axis=1).to_numpy())
    rpos = stack(right, flows.sum(axis=0).to_numpy())
    x0, x1, w = 0.0, 1.0, 0.04
    s = np.linspace(0, 1, 60)
    bez = 3 * s ** 2 - 2 * s ** 3  # cubic Bezier with horizontal tangents at both ends
    xs = x0 + w + (x1 - x0 - 2 * w) * s
    lcur = {k: v[1] for k, v in lpos.items()}
    rcur = {k: v[1] for k, v in rpos.items()}
    for a in left:          # bands in a fixed order: left top to bottom, right top to bottom
        for b in right:
            v = int(flows.loc[a, b])
            if v == 0:
                continue
            h = v * scale
            ly, ry = lcur[a], rcur[b]
            top = ly + (ry - ly) * bez
            ax.fill_between(xs, top - h, top, color=pal[a], alpha=0.55 if a == b else 0.35, lw=0)
            lcur[a] -= h
            rcur[b] -= h
    for names, pos, x, ha, dx in ((left, lpos, x0, "right", -0.01), (right, rpos, x1 - w, "left", w + 0.01)):
        for nm in names:
            lo, hi = pos[nm]
            ax.add_patch(Rectangle((x, lo), w, hi - lo, color=pal[nm], lw=0))
            ax.text(x + dx, (lo + hi) / 2, nm, ha=ha, va="center", fontsize=8)
    ax.text(x0 + w / 2, 1.03, left_title, ha="center", fontsize=9, weight="bold")
    ax.text(x1 - w / 2, 1.03, right_title, ha="center", fontsize=9, weight="bold")
    ax.set_xlim(-0.3, 1.3)
    ax.set_ylim(min(min(v[0] for v in lpos.values()), min(v[0] for v in rpos.values())) - 0.02, 1.07)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
