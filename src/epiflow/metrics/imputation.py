"""Imputation metrics (SPEC §5, imputation), following the EpiAgent paper's evaluation.

* :func:`open_fraction_filter` — cCREs accessible in at least a fraction (paper: 3 %) of the cells.
* :func:`group_means` — mean signal of every cell type (rows = types).
* :func:`rowwise_pearson`, :func:`colwise_pearson`, :func:`rowwise_mse`, :func:`colwise_mse` — Pearson
  r / MSE between matching rows / columns of two matrices (NaN where a row or column is constant).
* :func:`signal_agreement` — Pearson r and MSE of a (imputed / raw / baseline) matrix against the
  per-cell-type mean signal of a reference matrix, per cell (rows) and per cCRE (columns); computed in
  blocks of rows / columns, so its float64 temporaries are a few blocks, not copies of the matrix (the
  values are those of the whole-matrix formulas, bit for bit).
* :func:`pca_leiden_scores` — PCA, then Leiden with the resolution bisected to the number of cell
  types, then NMI / ARI (:mod:`epiflow.metrics.clustering`).
* :func:`evaluate_imputation` — the imputation task's scores of each method's matrix (the two above,
  against the per-type mean of the raw TF-IDF): EpiAgent's and every baseline's rows come from it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import scipy.sparse as sp

from ..errors import EpiflowError

log = logging.getLogger(__name__)

#: kNN graph size of the PCA + Leiden scoring of an imputed matrix
N_NEIGHBORS = 15


# float64 elements in one block of signal_agreement / group_means (16 MiB): their temporaries are a few
# such blocks whatever the size of the matrix
_BLOCK = 1 << 21


def _dense(x, dtype=np.float64) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=dtype)


def _blocks(n: int, width: int, min_size: int = 1):
    """``(start, stop)`` of consecutive blocks of ``n`` rows (or columns), each of about :data:`_BLOCK`
    elements when a row holds ``width`` of them, and none of fewer than ``min_size`` (when ``n`` allows)."""
    step = max(min_size, _BLOCK // max(int(width), 1))
    out = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < min_size:
        out[-2:] = [(out[-2][0], n)]
    return out


def open_fraction_filter(counts, min_fraction: float = 0.03) -> np.ndarray:
    """Boolean mask of the columns (cCREs) with a non-zero value in ``>= min_fraction`` of the rows."""
    if not 0.0 <= float(min_fraction) <= 1.0:
        raise EpiflowError(f"min_fraction must be in [0, 1], got {min_fraction}", field="min_fraction")
    n = counts.shape[0]
    if n == 0:
        raise EpiflowError("no cells", field="counts")
    if sp.issparse(counts):
        c = sp.csc_matrix(counts)
        c.eliminate_zeros()
        nnz = np.diff(c.indptr)
    else:
        nnz = (np.asarray(counts) != 0).sum(axis=0)
    return nnz >= float(min_fraction) * n - 1e-9


def group_means(x, groups) -> tuple[np.ndarray, np.ndarray]:
    """``(group names (sorted), means [n_groups, n_cols])`` of the rows of ``x`` per group."""
    g = np.asarray(groups).astype(str)
    if g.shape[0] != x.shape[0]:
        raise EpiflowError(f"{g.shape[0]} groups for {x.shape[0]} rows", field="groups")
    names, inv = np.unique(g, return_inverse=True)
    ind = sp.csr_matrix((np.ones(len(g)), (inv, np.arange(len(g)))), shape=(len(names), len(g)))
    if sp.issparse(x):
        sums = _dense(ind @ sp.csr_matrix(x))
    else:  # float64 sums of a block of columns at a time (each sum is the same, no float64 copy of x)
        x = np.asarray(x)
        sums = np.empty((len(names), x.shape[1]))
        for lo, hi in _blocks(x.shape[1], x.shape[0]):
            sums[:, lo:hi] = ind @ np.asarray(x[:, lo:hi], dtype=np.float64)
    return names, sums / np.bincount(inv, minlength=len(names))[:, None]


def rowwise_pearson(a, b) -> np.ndarray:
    """Pearson r between row i of ``a`` and row i of ``b`` (NaN where either row is constant)."""
    a, b = _dense(a), _dense(b)
    if a.shape != b.shape:
        raise EpiflowError(f"matrices differ in shape: {a.shape} vs {b.shape}", field="matrix")
    ac = a - a.mean(axis=1, keepdims=True)
    bc = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((ac * ac).sum(axis=1) * (bc * bc).sum(axis=1))
    num = (ac * bc).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den > 1e-12, num / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(r, -1.0, 1.0)


def colwise_pearson(a, b) -> np.ndarray:
    """Pearson r between column j of ``a`` and column j of ``b``."""
    return rowwise_pearson(_dense(a).T, _dense(b).T)


def rowwise_mse(a, b) -> np.ndarray:
    a, b = _dense(a), _dense(b)
    if a.shape != b.shape:
        raise EpiflowError(f"matrices differ in shape: {a.shape} vs {b.shape}", field="matrix")
    return ((a - b) ** 2).mean(axis=1)


def colwise_mse(a, b) -> np.ndarray:
    return rowwise_mse(_dense(a).T, _dense(b).T)


def signal_agreement(x, labels, reference=None) -> dict[str, np.ndarray]:
    """Agreement of ``x`` (cells x cCREs) with the per-cell-type mean signal.

    The target of cell i is the mean of ``reference`` (default ``x`` itself) over the cells of
    ``labels[i]``'s type. Returns ``pearson_cell``, ``mse_cell`` (one value per cell: row of ``x`` vs
    its target row) and ``pearson_ccre``, ``mse_ccre`` (one per cCRE: column of ``x`` vs the target
    column over all cells).
    """
    reference = x if reference is None else reference
    if reference.shape != x.shape:
        raise EpiflowError(f"reference {reference.shape} and matrix {x.shape} differ in shape", field="reference")
    names, means = group_means(reference, labels)
    code = np.searchsorted(names, np.asarray(labels).astype(str))
    # the target of cell i is means[code[i]]: never built whole; blocks of rows give the per-cell values,
    # blocks of columns (every cell) the per-cCRE ones, each as the whole-matrix formula would
    n, m = x.shape
    out = {k: np.empty(n) for k in ("pearson_cell", "mse_cell")}
    out.update({k: np.empty(m) for k in ("pearson_ccre", "mse_ccre")})
    for lo, hi in _blocks(n, m):
        xb, tb = _dense(x[lo:hi]), means[code[lo:hi]]
        out["pearson_cell"][lo:hi] = rowwise_pearson(xb, tb)
        out["mse_cell"][lo:hi] = rowwise_mse(xb, tb)
    xc = sp.csc_matrix(x) if sp.issparse(x) else x
    for lo, hi in _blocks(m, n, min_size=2):
        # a block in the layout of the whole matrix (C for sparse input: csr's toarray) and at least two
        # columns wide, so numpy sums over the cells in the same order as on the whole matrix (one
        # column alone would be summed pairwise)
        xb = _dense(xc[:, lo:hi].toarray(order="C") if sp.issparse(xc) else xc[:, lo:hi])
        tb = means[:, lo:hi][code]
        out["pearson_ccre"][lo:hi] = colwise_pearson(xb, tb)
        out["mse_ccre"][lo:hi] = colwise_mse(xb, tb)
    return {k: out[k] for k in ("pearson_cell", "mse_cell", "pearson_ccre", "mse_ccre")}


def pca_leiden_scores(x, labels, *, n_pcs: int = 50, n_neighbors: int = 15, seed: int = 0,
                      max_iter: int = 30) -> dict[str, float]:
    """PCA (scikit-learn, ``n_pcs`` clipped to the matrix), kNN graph, Leiden bisected to the number
    of distinct labels, and ``NMI``, ``ARI`` against the labels; also ``n_clusters``, ``leiden_reached``,
    ``leiden_resolution`` and ``n_pcs``."""
    from sklearn.decomposition import PCA

    from .clustering import clustering_scores, leiden_bisect

    xd = _dense(x, np.float32)  # no copy of a float32 matrix (PCA copies before centring)
    y = np.asarray(labels).astype(str)
    if xd.shape[0] != y.shape[0]:
        raise EpiflowError(f"{y.shape[0]} labels for {xd.shape[0]} cells", field="labels")
    k = int(min(n_pcs, xd.shape[0] - 1, xd.shape[1] - 1))
    if k < 2:
        raise EpiflowError(f"PCA needs at least 3 cells and 3 features, got {xd.shape}", field="matrix")
    pcs = PCA(n_components=k, random_state=seed, svd_solver="auto").fit_transform(xd)
    n_types = len(np.unique(y))
    lab, res, reached = leiden_bisect(pcs, n_types, n_neighbors=n_neighbors, seed=seed, max_iter=max_iter)
    s = clustering_scores(y, lab)
    return {"NMI": s["NMI"], "ARI": s["ARI"], "n_clusters": int(lab.max()) + 1, "leiden_reached": int(reached),
            "leiden_resolution": float(res), "n_pcs": k}


def evaluate_imputation(matrices: dict, labels, reference, *, n_pcs: int = 50, n_neighbors: int = 15,
                        seed: int = 0, max_iter: int = 30):
    """Metrics of each matrix (``{method: cells x cCREs}``) against ``labels`` and the per-type mean of
    ``reference`` (the imputation task's scoring, used for EpiAgent and for every baseline: cells x cCREs
    of the labelled cells, the reference being their raw TF-IDF). Returns ``(values per method,
    agreement arrays per method)`` (:func:`signal_agreement`'s four arrays)."""
    y = np.asarray(labels).astype(str)
    out, per_cell = {}, {}
    for method, m in matrices.items():
        vals = pca_leiden_scores(m, y, n_pcs=n_pcs, n_neighbors=n_neighbors, seed=seed, max_iter=max_iter)
        agr = signal_agreement(m, y, reference)
        for key in ("pearson_cell", "mse_cell", "pearson_ccre", "mse_ccre"):
            a = agr[key]
            vals[f"{key}_median"] = float(np.nanmedian(a)) if np.isfinite(a).any() else math.nan
            vals[f"{key}_mean"] = float(np.nanmean(a)) if np.isfinite(a).any() else math.nan
        vals["n_nan_pearson_cell"] = int(np.isnan(agr["pearson_cell"]).sum())
        vals["n_nan_pearson_ccre"] = int(np.isnan(agr["pearson_ccre"]).sum())
        out[method] = vals
        per_cell[method] = agr
        log.info("%s: NMI %.3f ARI %.3f | Pearson per cell %.3f per cCRE %.3f | MSE per cell %.4g", method,
                 vals["NMI"], vals["ARI"], vals["pearson_cell_median"], vals["pearson_ccre_median"],
                 vals["mse_cell_median"])
    return out, per_cell
