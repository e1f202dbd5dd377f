"""Metrics for the downstream tasks (SPEC §5), built on scikit-learn, scipy and scanpy, and the common
long metrics table (:mod:`epiflow.metrics.table`).

Every function here has a unit test with a known answer (``tests/test_metrics.py``). The names below
are imported on first use, so that ``epiflow.metrics.table`` stays light (no scanpy).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "leiden_bisect": "clustering", "clustering_scores": "clustering", "knn_graph": "clustering",
    "label_silhouette": "clustering", "embedding_scores": "clustering", "parse_order": "ordering", "order_spearman": "ordering",
    "order_spearman_cells": "ordering", "HEMATOPOIESIS_ORDER": "ordering",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
