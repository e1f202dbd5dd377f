"""Agreement of a per-cell quantity (pseudotime) with a known partial order of cell types.

An order is written as tiers separated by ``<``; types within a tier are separated by commas and are
tied, e.g. the haematopoietic order of Buenrostro et al. 2018 (EpiAgent Fig. 2d-g)::

    HSC < MPP < LMPP, CMP < GMP, MEP, CLP     ->  HSC 0, MPP 1, LMPP 2, CMP 2, GMP 3, MEP 3, CLP 3

Spearman's rank correlation (``scipy.stats.spearmanr``, ties -> average ranks) is computed between the
tier of each type and a value per type (:func:`order_spearman`), or per cell (:func:`order_spearman_cells`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import EpiflowError

HEMATOPOIESIS_ORDER = "HSC < MPP < LMPP, CMP < GMP, MEP, CLP"


def parse_order(order) -> dict[str, int]:
    """``{cell_type: tier}`` from a string ``"A < B, C < D"`` or a sequence of tiers.

    A sequence item may be a type name (a tier of one) or a list/tuple of tied names.
    """
    if isinstance(order, Mapping):
        return {str(k): int(v) for k, v in order.items()}
    if isinstance(order, str):
        tiers = [[t.strip() for t in tier.split(",") if t.strip()] for tier in order.split("<")]
    else:
        tiers = [[str(t)] if isinstance(t, str) else [str(x) for x in t] for t in order]
    ranks: dict[str, int] = {}
    for i, tier in enumerate(tiers):
        if not tier:
            raise EpiflowError(f"empty tier {i + 1} in cell-type order {order!r}", field="order",
                               fix="write the order as 'A < B, C < D'")
        for t in tier:
            if t in ranks:
                raise EpiflowError(f"cell type {t!r} appears twice in the order {order!r}", field="order")
            ranks[t] = i
    return ranks


def order_spearman(values: Mapping[str, float], order) -> tuple[float, float, int]:
    """Spearman rho (and p-value) between per-type ``values`` and the tiers of ``order``.

    Only types present in both (and with a finite value) count; returns ``(rho, p, n_types)``,
    ``rho`` is NaN when fewer than 3 types or fewer than 2 tiers remain.
    """
    from scipy.stats import spearmanr

    ranks = parse_order(order)
    keys = [k for k in ranks if k in values and np.isfinite(values[k])]
    if len(keys) < 3 or len({ranks[k] for k in keys}) < 2:
        return float("nan"), float("nan"), len(keys)
    r = spearmanr([ranks[k] for k in keys], [float(values[k]) for k in keys])
    return float(r.statistic), float(r.pvalue), len(keys)


def order_spearman_cells(values: Sequence[float], labels: Sequence[str], order) -> tuple[float, float, int]:
    """Spearman rho (and p-value) between per-cell ``values`` and the tier of each cell's label.

    Cells whose label is not in the order, or whose value is not finite, are left out;
    returns ``(rho, p, n_cells)``.
    """
    from scipy.stats import spearmanr

    ranks = parse_order(order)
    v = np.asarray(values, dtype=np.float64)
    lab = np.asarray(labels).astype(str)
    if v.shape[0] != lab.shape[0]:
        raise EpiflowError(f"{v.shape[0]} values but {lab.shape[0]} labels", field="labels")
    tier = np.array([ranks.get(x, -1) for x in np.unique(lab)])[np.unique(lab, return_inverse=True)[1]]
    keep = (tier >= 0) & np.isfinite(v)
    if keep.sum() < 3 or len(np.unique(tier[keep])) < 2:
        return float("nan"), float("nan"), int(keep.sum())
    r = spearmanr(tier[keep], v[keep])
    return float(r.statistic), float(r.pvalue), int(keep.sum())
