"""Figures of ``epiflow integrate``: the UMAPs of every embedding coloured by batch and by cell type
(the coordinates are computed by :func:`epiflow.tasks.integration.run`, ``data["umap"]``)."""

from __future__ import annotations

import os
from pathlib import Path

from .embedding import umap_figure


def integration_figures(result, out: str | os.PathLike, *, svg: bool = False) -> list[Path]:
    """``umap_batch.png`` and ``umap_cell_type.png`` in ``out`` from the
    :class:`~epiflow.tasks.common.TaskResult` of :func:`epiflow.tasks.integration.run` (nothing when it
    has no UMAP coordinates). Returns the paths written."""
    data = result.data
    coords = data.get("umap") or {}
    if not coords:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    batches, labels, dataset = data["umap_batches"], data["umap_labels"], data["dataset"]
    written = umap_figure({m: (xy, batches, f"{m}: by batch") for m, xy in coords.items()}, out / "umap_batch.png",
                          suptitle=f"Integration of {dataset}: UMAP coloured by batch", svg=svg)
    written += umap_figure({m: (xy, labels, f"{m}: by cell type") for m, xy in coords.items()},
                           out / "umap_cell_type.png",
                           suptitle=f"Integration of {dataset}: UMAP coloured by cell type", svg=svg)
    return written
