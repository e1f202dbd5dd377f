"""Metrics of perturbation prediction (SPEC §5): stimulated and genetic perturbations.

* :func:`differential_accessibility` - Wilcoxon rank-sum test per cCRE between the unperturbed and
  the perturbed cells (scanpy ``rank_genes_groups(method="wilcoxon")``, perturbed vs unperturbed);
  returns the z-scores (positive = opens under the perturbation). :func:`top_da` picks the top-k
  "up" (largest z), "down" (smallest z) and "all" (largest |z|) cCREs.
* :func:`r2_linear` - R^2 of the least-squares line of predicted on real mean accessibility
  (= squared Pearson r; scGen / scPRAM convention).
* :func:`pearson` - Pearson r (genetic perturbation, GEARS convention).
* :func:`direction_accuracy` - for the top-k up (down) DA cCREs, the fraction whose predicted change
  (predicted mean - unperturbed mean) is > 0 (< 0). A predicted change of exactly 0 counts 1/2 (no
  information = chance), so the "no change" predictor scores 0.5 instead of an arbitrary 0.
* :func:`wasserstein` - exact optimal-transport (POT ``ot.emd2``) distance between two cell sets,
  uniform weights, Euclidean ground cost (``metric="euclidean"``, not squared).

``k`` larger than the number of available cCREs is capped (``cap_k`` logs a warning and the capped
value is reported by the callers as ``k_used``).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

DEFAULT_KS = (100, 250, 500, 1000)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def cap_k(k: int, available: int, what: str = "cCREs") -> int:
    """``min(k, available)``, with a warning when capped."""
    k, available = int(k), int(available)
    if k > available:
        log.warning("k=%d is larger than the %d %s available: capped to %d", k, available, what, available)
        return available
    return k


# ----------------------------------------------------------------------------- scores
def r2_linear(real, pred) -> float:
    """R^2 of the linear regression of ``pred`` on ``real`` (= Pearson r squared; nan if constant)."""
    r = pearson(real, pred)
    return float(r * r) if np.isfinite(r) else float("nan")


def pearson(real, pred) -> float:
    """Pearson correlation (nan when either vector is constant or shorter than 2)."""
    a, b = np.asarray(real, dtype=np.float64).ravel(), np.asarray(pred, dtype=np.float64).ravel()
    if a.size < 2 or a.size != b.size:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def direction_accuracy(pred_change, idx_up, idx_down) -> dict[str, float]:
    """Fraction of correctly signed predicted changes on the up / down DA cCREs (ties count 1/2).

    Returns ``{"up": ..., "down": ..., "all": ...}`` (``all`` over both sets together)."""
    d = np.asarray(pred_change, dtype=np.float64).ravel()

    def score(x, sign):
        if x.size == 0:
            return np.zeros(0)
        s = np.sign(x) * sign
        return np.where(s > 0, 1.0, np.where(s == 0, 0.5, 0.0))

    up, down = score(d[np.asarray(idx_up, dtype=np.int64)], 1), score(d[np.asarray(idx_down, dtype=np.int64)], -1)
    both = np.concatenate([up, down])
    mean = lambda x: float(x.mean()) if x.size else float("nan")  # noqa: E731
    return {"up": mean(up), "down": mean(down), "all": mean(both)}


def wasserstein(x, y, *, max_cells: int | None = 2000, seed: int = 0) -> float:
    """Exact OT distance (POT ``emd2``) between the rows of ``x`` and ``y`` with uniform weights and a
    Euclidean ground cost. Sets larger than ``max_cells`` are subsampled (seeded) to bound the cost."""
    import ot

    x, y = _dense(x), _dense(y)
    if len(x) == 0 or len(y) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    if max_cells is not None:
        if len(x) > max_cells:
            x = x[rng.choice(len(x), max_cells, replace=False)]
        if len(y) > max_cells:
            y = y[rng.choice(len(y), max_cells, replace=False)]
    M = ot.dist(x, y, metric="euclidean")
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    return float(ot.emd2(a, b, M, numItermax=1_000_000))


# ----------------------------------------------------------------------------- DA
def differential_accessibility(X_control, X_perturbed, *, tie_correct: bool = False) -> np.ndarray:
    """Wilcoxon z-score per cCRE, perturbed vs unperturbed cells (scanpy ``rank_genes_groups``).

    ``tie_correct``: the z-scores' variance corrected for ties. Off by default, as in the paper
    (episcanpy's ``rank_features`` calls scanpy's ``rank_genes_groups`` with its default). On 0/1
    accessibility every cCRE has two tie groups, and the correction divides a cCRE's score by about
    sqrt(3 p (1 - p)) (p: its fraction of open cells): it ranks rarely open cCREs higher.

    Inputs are cells x cCREs (binary or counts; sparse or dense); returns ``[n_cCREs]`` scores in the
    column order (positive = more accessible after the perturbation). nan scores (constant cCREs) -> 0.
    """
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    n0, n1 = X_control.shape[0], X_perturbed.shape[0]
    if n0 < 2 or n1 < 2:
        from ..errors import InputFormatError

        raise InputFormatError(f"differential accessibility needs >= 2 cells per group (got {n0} unperturbed, "
                               f"{n1} perturbed)", field="cells")
    X = sp.vstack([sp.csr_matrix(X_control, dtype=np.float32), sp.csr_matrix(X_perturbed, dtype=np.float32)]).tocsr()
    n = X.shape[1]
    a = ad.AnnData(X=X, obs=pd.DataFrame({"g": pd.Categorical(["ctrl"] * n0 + ["pert"] * n1)},
                                         index=[str(i) for i in range(n0 + n1)]),
                   var=pd.DataFrame(index=[str(j) for j in range(n)]))
    verbosity = sc.settings.verbosity
    sc.settings.verbosity = 0  # 0/1 accessibility is not log data: silence scanpy's hint about it
    try:
        sc.tl.rank_genes_groups(a, "g", groups=["pert"], reference="ctrl", method="wilcoxon", n_genes=n,
                                use_raw=False, tie_correct=bool(tie_correct))
    finally:
        sc.settings.verbosity = verbosity
    res = a.uns["rank_genes_groups"]
    names = np.asarray(res["names"]["pert"]).astype(np.int64)
    scores = np.asarray(res["scores"]["pert"], dtype=np.float64)
    out = np.zeros(n, dtype=np.float64)
    out[names] = np.nan_to_num(scores, nan=0.0)
    return out


def top_da(scores, k: int) -> dict[str, np.ndarray]:
    """Indices of the top-``k`` up (largest score, > 0), down (smallest, < 0) and all (largest |score|)
    cCREs. Up/down sets only contain cCREs with the right sign, so they can be shorter than k."""
    s = np.asarray(scores, dtype=np.float64)
    order_up = np.argsort(-s, kind="stable")
    order_dn = np.argsort(s, kind="stable")
    up = order_up[: int(k)]
    up = up[s[up] > 0]
    dn = order_dn[: int(k)]
    dn = dn[s[dn] < 0]
    allk = np.argsort(-np.abs(s), kind="stable")[: int(k)]
    return {"up": up, "down": dn, "all": allk}
