"""Figures of the downstream tasks: matplotlib's object API on the Agg canvas (no pyplot state),
written atomically as PNG (and SVG on request)."""

from .embedding import category_palette, embedding_panel, save_figure, trajectory_figure, umap_figure

__all__ = ["category_palette", "embedding_panel", "save_figure", "umap_figure", "trajectory_figure"]
