"""LSI baseline: TF-IDF + truncated SVD, the standard linear embedding of scATAC-seq counts.

Recipe (Cusanovich et al. 2018 / ArchR / Signac style), all on a cells x cCREs (or peaks) matrix:

1. binarise the counts (accessible or not);
2. TF = x / (number of accessible features of the cell);
   IDF = log(1 + n_cells / (1 + number of cells in which the feature is accessible));
   TF-IDF = log1p(TF * IDF * 1e4)  (features never accessible are all zero and drop out);
3. ``sklearn.decomposition.TruncatedSVD`` (randomized, ``random_state=seed``), cell coordinates
   U * S; the components are not otherwise scaled;
4. the first component of LSI on scATAC data usually tracks sequencing depth rather than biology:
   with ``drop_first='auto'`` it is dropped when ``|Spearman(component 1, depth)| > 0.9``, where depth
   is the number of accessible features per cell; ``True`` / ``False`` force it.

The result has ``n_components`` columns, or ``n_components - 1`` when the first was dropped
(as in Signac's habit of computing 50 and using 2:50).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from ..errors import EpiflowError

log = logging.getLogger(__name__)

DEPTH_SPEARMAN_THRESHOLD = 0.9


def tfidf_lsi_matrix(counts) -> sp.csr_matrix:
    """The log TF-IDF matrix of step 1-2 above (CSR float32, cells x features)."""
    x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    x.eliminate_zeros()
    x.data[:] = 1.0
    n_cells = x.shape[0]
    depth = np.asarray(x.sum(axis=1)).ravel()
    df = np.bincount(x.indices, minlength=x.shape[1]).astype(np.float64)
    idf = np.log1p(n_cells / (1.0 + df))
    rows = np.repeat(np.arange(n_cells), np.diff(x.indptr))
    with np.errstate(divide="ignore", invalid="ignore"):
        tf = x.data / depth[rows]
    x.data = np.log1p(tf * idf[x.indices] * 1e4).astype(np.float32)
    return x


def lsi(counts_csr, n_components: int = 50, drop_first="auto", seed: int = 0, *, return_info: bool = False):
    """LSI embedding of a cells x features count matrix (see the module docstring).

    Parameters
    ----------
    counts_csr : scipy sparse or dense array, cells x features, raw (or binary) counts
    n_components : number of SVD components computed (30-50 is usual); clipped to
        ``min(n_cells, n_features) - 1`` with a warning when larger
    drop_first : ``'auto'`` (drop if ``|rho(comp1, depth)| > 0.9``), ``True`` or ``False``
    seed : ``random_state`` of the randomized SVD
    return_info : also return ``{'depth_spearman', 'dropped_first', 'n_components',
        'explained_variance_ratio'}``

    Returns
    -------
    np.ndarray float32, cells x (n_components or n_components - 1) [, info dict]
    """
    from scipy.stats import spearmanr
    from sklearn.decomposition import TruncatedSVD

    if drop_first not in ("auto", True, False):
        raise EpiflowError(f"drop_first must be 'auto', True or False, got {drop_first!r}", field="drop_first")
    if not sp.issparse(counts_csr):
        counts_csr = sp.csr_matrix(np.asarray(counts_csr))
    if counts_csr.ndim != 2:
        raise EpiflowError("counts must be a 2-d cells x features matrix", field="counts")
    n_cells, n_feat = counts_csr.shape
    x = tfidf_lsi_matrix(counts_csr)
    depth = np.diff(x.indptr)
    if (depth == 0).any():
        raise EpiflowError(f"{int((depth == 0).sum())} of {n_cells} cells have no accessible feature",
                           field="counts", fix="remove empty cells before LSI (corpus QC does this)")
    max_k = min(n_cells, n_feat) - 1
    if max_k < 2:
        raise EpiflowError(f"LSI needs at least 3 cells and 3 features, got {n_cells} x {n_feat}",
                           field="counts")
    k = int(n_components)
    if k < 2:
        raise EpiflowError(f"n_components must be >= 2, got {k}", field="n_components")
    if k > max_k:
        log.warning("LSI: %d components asked for but the matrix is %d x %d; using %d", k, n_cells, n_feat, max_k)
        k = max_k
    svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=7, random_state=seed)
    emb = svd.fit_transform(x)
    if np.ptp(depth) == 0 or np.ptp(emb[:, 0]) == 0:
        rho = 0.0  # constant depth (or component): no depth effect to remove
    else:
        rho = float(spearmanr(emb[:, 0], depth).statistic)
    drop = bool(abs(rho) > DEPTH_SPEARMAN_THRESHOLD) if drop_first == "auto" else bool(drop_first)
    log.info("LSI: %d cells x %d features -> %d components; |Spearman(comp1, depth)| = %.3f%s",
             n_cells, n_feat, k, abs(rho), " -> first component dropped" if drop else "")
    out = np.ascontiguousarray(emb[:, 1:] if drop else emb, dtype=np.float32)
    if return_info:
        return out, {"depth_spearman": rho, "dropped_first": drop, "n_components": int(out.shape[1]),
                     "explained_variance_ratio": svd.explained_variance_ratio_.tolist()}
    return out
