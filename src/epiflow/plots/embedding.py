"""Embedding scatter plots (UMAP coloured by cell type) and trajectory panels (PAGA + pseudotime)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..io import atomic_path

_MISSING_COLOUR = "#d0d0d0"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, *, svg: bool = False) -> list[Path]:
    """Write ``fig`` to ``path`` (PNG) atomically, plus ``path.with_suffix('.svg')`` when ``svg``."""
    path = Path(path)
    out = []
    for p, fmt in [(path, "png")] + ([(path.with_suffix(".svg"), "svg")] if svg else []):
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150 if fmt == "png" else None)
        out.append(p)
    return out


def category_palette(categories: Sequence[str]) -> dict[str, str]:
    """A fixed colour per category (sorted order; tab10 up to 10, tab20 up to 20, then hsv)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cats = sorted({str(c) for c in categories})
    n = len(cats)
    if n <= 10:
        cols = [colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        cols = [colormaps["tab20"](i) for i in range(n)]
    else:
        cols = [colormaps["hsv"](i / n) for i in range(n)]
    return {c: to_hex(col) for c, col in zip(cats, cols)}


def embedding_panel(ax, coords, labels, *, palette: Mapping[str, str] | None = None, title: str = "",
                    legend: bool = True, point_size: float | None = None, xlabel: str = "UMAP1",
                    ylabel: str = "UMAP2", legend_title: str = "cell type") -> None:
    """Scatter ``coords`` (n x 2) coloured by ``labels`` on ``ax``."""
    coords = np.asarray(coords)
    labels = np.asarray(labels).astype(str)
    palette = dict(palette or category_palette(labels))
    s = point_size if point_size is not None else float(np.clip(3000.0 / max(len(labels), 1), 1.0, 25.0))
    order = np.random.default_rng(0).permutation(len(labels))  # no category painted over all others
    colours = np.array([palette.get(x, _MISSING_COLOUR) for x in labels])
    ax.scatter(coords[order, 0], coords[order, 1], c=colours[order], s=s, linewidths=0, rasterized=True)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend:
        present = [c for c in palette if c in set(labels)]
        handles = [ax.scatter([], [], c=palette[c], s=30, label=f"{c} ({int((labels == c).sum())})")
                   for c in present]
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
                  markerscale=1.0, title=legend_title, title_fontsize=8)


def umap_figure(panels: Mapping[str, tuple[np.ndarray, np.ndarray, str]], path, *, suptitle: str = "",
                svg: bool = False) -> list[Path]:
    """One figure with a UMAP panel per method, side by side.

    ``panels``: ``{method: (coords n x 2, labels, panel title)}``; colours are shared across panels.
    """
    labels_all = np.concatenate([np.asarray(v[1]).astype(str) for v in panels.values()])
    pal = category_palette(labels_all)
    n = len(panels)
    fig = _figure(4.6 * n + 1.6, 4.4)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for i, (ax, (name, (xy, lab, title))) in enumerate(zip(axes, panels.items())):
        embedding_panel(ax, xy, lab, palette=pal, title=title or name, legend=(i == n - 1))
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    return save_figure(fig, path, svg=svg)


def trajectory_figure(panels: Mapping[str, dict], path, *, suptitle: str = "", svg: bool = False) -> list[Path]:
    """Trajectory panels, one row per method.

    Each value of ``panels`` is a dict with ``coords`` (n x 2 UMAP), ``labels``, ``pseudotime`` (n),
    ``root`` (cell index), ``paga`` (types x types connectivity matrix, dense), ``paga_types``
    (their names), ``table`` (the per-type trajectory DataFrame with ``cell_type`` and
    ``mean_pseudotime``), ``title``. Columns: UMAP coloured by pseudotime (root marked), the PAGA
    graph of the types drawn at their UMAP centroids (edge width = connectivity, edges < 0.05 hidden),
    mean pseudotime per type in the known order.
    """
    n = len(panels)
    labels_all = np.concatenate([np.asarray(v["labels"]).astype(str) for v in panels.values()])
    pal = category_palette(labels_all)
    fig = _figure(14.5, 4.2 * n)
    axes = fig.subplots(n, 3, squeeze=False)
    for row, (name, d) in zip(axes, panels.items()):
        xy = np.asarray(d["coords"])
        pt = np.asarray(d["pseudotime"], dtype=float)
        lab = np.asarray(d["labels"]).astype(str)
        ax = row[0]
        ok = np.isfinite(pt)
        ax.scatter(xy[~ok, 0], xy[~ok, 1], c=_MISSING_COLOUR, s=6, linewidths=0)
        sca = ax.scatter(xy[ok, 0], xy[ok, 1], c=pt[ok], cmap="viridis", s=8, linewidths=0, rasterized=True)
        r = int(d["root"])
        ax.scatter([xy[r, 0]], [xy[r, 1]], marker="*", s=220, c="red", edgecolors="black", linewidths=0.6,
                   label="root")
        ax.legend(loc="best", fontsize=8, frameon=False)
        fig.colorbar(sca, ax=ax, shrink=0.8, label="diffusion pseudotime")
        ax.set_title(f"{d.get('title', name)}\npseudotime on UMAP", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP1", fontsize=9)
        ax.set_ylabel("UMAP2", fontsize=9)

        ax = row[1]
        types = [str(t) for t in d["paga_types"]]
        con = np.asarray(d["paga"], dtype=float)
        cen = np.array([xy[lab == t].mean(axis=0) if (lab == t).any() else [np.nan, np.nan] for t in types])
        for i in range(len(types)):
            for j in range(i + 1, len(types)):
                w = con[i, j]
                if w >= 0.05:
                    ax.plot(cen[[i, j], 0], cen[[i, j], 1], c="black", lw=0.5 + 6 * w, alpha=0.6, zorder=1)
        sizes = np.array([(lab == t).sum() for t in types], dtype=float)
        ax.scatter(cen[:, 0], cen[:, 1], s=80 + 600 * sizes / max(sizes.max(), 1), c=[pal[t] for t in types],
                   edgecolors="black", linewidths=0.6, zorder=2)
        for t, (x, y), sz in zip(types, cen, sizes):
            ax.annotate(t, (x, y), fontsize=8, ha="center", va="bottom",
                        xytext=(0, 6 + 0.5 * math.sqrt(80 + 600 * sz / max(sizes.max(), 1))),
                        textcoords="offset points", zorder=3)
        ax.set_title(f"{name}: PAGA graph of cell types\n(edge width = connectivity)", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])

        ax = row[2]
        tab = d["table"]
        ax.bar(np.arange(len(tab)), tab["mean_pseudotime"].to_numpy(dtype=float),
               color=[pal.get(str(t), _MISSING_COLOUR) for t in tab["cell_type"]], edgecolor="black", lw=0.5)
        ax.set_xticks(np.arange(len(tab)), [str(t) for t in tab["cell_type"]], rotation=45, ha="right",
                      fontsize=8)
        ax.set_ylabel("mean diffusion pseudotime", fontsize=9)
        rho = tab.attrs.get("spearman_types", math.nan)
        ax.set_title(f"{name}: mean pseudotime per type (known order)\nSpearman vs order = {rho:.3f}",
                     fontsize=10)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    return save_figure(fig, path, svg=svg)
