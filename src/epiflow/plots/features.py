"""Figures of feature extraction (``epiflow evaluate-features``): the UMAP of each embedding coloured by
cell type, and the trajectory panels (PAGA + diffusion pseudotime), drawn from what
:func:`epiflow.tasks.features.run` returns."""

from __future__ import annotations

import os
from pathlib import Path

from ..tasks.features import _slug
from .embedding import trajectory_figure, umap_figure


def feature_figures(result, out: str | os.PathLike, *, svg: bool = False) -> list[Path]:
    """``umap_<method>.png`` per method and ``umap.png`` (all side by side), and with the trajectory
    ``trajectory.png``, in ``out``. ``result``: the TaskResult of :func:`epiflow.tasks.features.run`
    (its ``data``: ``umap_panels``, ``trajectory_panels``, ``dataset``, ``label_key``, ``root_type``,
    ``order``). Nothing is drawn for an empty panel set (``umap`` off). Returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = result.data
    written: list[Path] = []
    umap_panels = d.get("umap_panels") or {}
    if umap_panels:
        for method, panel in umap_panels.items():
            written += umap_figure({method: panel}, out / f"umap_{_slug(method)}.png", svg=svg)
        written += umap_figure(umap_panels, out / "umap.png", svg=svg,
                               suptitle=f"Feature extraction on {d['dataset']}\nUMAP of each embedding, "
                                        f"coloured by {d['label_key']}")
    traj_panels = d.get("trajectory_panels") or {}
    if traj_panels:
        written += trajectory_figure(traj_panels, out / "trajectory.png", svg=svg,
                                     suptitle=f"Trajectory on {d['dataset']}: PAGA + diffusion pseudotime rooted "
                                              f"in {d['root_type']}\nknown order: {d['order']}")
    return written
