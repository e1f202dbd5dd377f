"""Metrics for the downstream tasks (SPEC §5), built on scikit-learn, scipy and scanpy.

Every function here has a unit test with a known answer (``tests/test_metrics.py``).
"""

from .clustering import clustering_scores, knn_graph, label_silhouette, leiden_bisect
from .ordering import HEMATOPOIESIS_ORDER, order_spearman, order_spearman_cells, parse_order

__all__ = [
    "leiden_bisect", "clustering_scores", "knn_graph", "label_silhouette",
    "parse_order", "order_spearman", "order_spearman_cells", "HEMATOPOIESIS_ORDER",
]
