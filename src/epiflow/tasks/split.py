"""The seeded cell splits of the downstream tasks, numpy only: a baseline tool's own environment (no torch)
imports them to hold out exactly the cells that EpiAgent's task holds out (:mod:`epiflow.baselines.run`)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def stratified_split(labels, query_fraction: float = 1 / 3, seed: int = 0) -> np.ndarray:
    """Seeded stratified split; returns a boolean array, True = query.

    Per label with ``n`` cells, ``round(n * query_fraction)`` random cells go to the query, kept within
    ``[1, n - 1]`` when ``n >= 2`` (so every type has reference and query cells); single cells stay
    in the reference."""
    if not 0.0 < float(query_fraction) < 1.0:
        raise ConfigError(f"query_fraction must be in (0, 1), got {query_fraction}", field="query_fraction")
    y = np.asarray(labels).astype(str)
    rng = np.random.default_rng([int(seed), 2 ** 16 + 3])
    is_query = np.zeros(len(y), dtype=bool)
    names, inv = np.unique(y, return_inverse=True)
    keys = rng.random(len(y))
    order = np.lexsort((keys, inv))  # random order within each label
    counts = np.bincount(inv, minlength=len(names))
    nq = np.rint(counts * float(query_fraction)).astype(np.int64)
    nq = np.where(counts >= 2, np.clip(nq, 1, counts - 1), 0)
    rank = np.arange(len(y)) - np.repeat(np.cumsum(counts) - counts, counts)
    is_query[order] = rank < np.repeat(nq, counts)
    return is_query
