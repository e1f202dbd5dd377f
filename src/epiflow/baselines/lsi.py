"""LSI baseline: TF-IDF + truncated SVD, the standard linear embedding of scATAC-seq counts.

Recipe (Cusanovich et al. 2018 / ArchR / Signac style), all on a cells x cCREs (or peaks) matrix:

1. binarise the counts (accessible or not);
2. TF = x / (number of accessible features of the cell);
   IDF = log(1 + n_cells / (1 + number of cells in which the feature is accessible));
   TF-IDF = log1p(TF * IDF * 1e4)  (features never accessible are all zero and drop out);
3. ``sklearn.decomposition.TruncatedSVD`` (randomized, ``random_state=seed``), cell coordinates
   U * S;
4. the first component of LSI on scATAC data usually tracks sequencing depth rather than biology:
   with ``drop_first='auto'`` it is dropped when ``|Spearman(component 1, depth)| > 0.9``, where depth
   is the number of accessible features per cell; ``True`` / ``False`` force it.

The result has ``n_components`` columns, or ``n_components - 1`` when the first was dropped
(as in Signac's habit of computing 50 and using 2:50).

Recipes (``recipe='TFIDF+SCALE'``; the field's variants differ by ~0.1 NMI on the same cells, see
docs/results_notes.md #15):

* TF-IDF ``log`` (above: ``log1p(TF * log-IDF * 1e4)``, ArchR's default), ``plain`` (``TF * log-IDF``,
  no outer log: Cusanovich 2018 / SnapATAC), ``signac`` (``log1p(TF * n_cells / n_open * 1e4)``,
  Signac ``RunTFIDF`` method 1);
* scaling of the kept components: ``us`` (U * S, unscaled), ``zscore`` (each component z-scored
  over cells, = Signac ``RunSVD(scale.embeddings = TRUE)``), ``l2`` (each cell's vector L2-normalised).

``DEFAULT_RECIPE`` (``plain+l2``) had the best mean NMI and ARI over three real bone-marrow sets (#15);
``log+us`` is the former default.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from ..errors import EpiflowError
from ..tokenize.core import binarize

log = logging.getLogger(__name__)

DEPTH_SPEARMAN_THRESHOLD = 0.9
TFIDF_KINDS = ("log", "plain", "signac")
SCALINGS = ("us", "zscore", "l2")
LSI_RECIPES = tuple(f"{t}+{s}" for t in TFIDF_KINDS for s in SCALINGS)
DEFAULT_RECIPE = "plain+l2"


def parse_recipe(recipe: str | None) -> tuple[str, str]:
    """``'TFIDF+SCALE'`` -> ``(tfidf, scaling)`` (None = :data:`DEFAULT_RECIPE`); clear error otherwise."""
    r = DEFAULT_RECIPE if recipe is None else str(recipe)
    parts = r.split("+")
    if len(parts) != 2 or parts[0] not in TFIDF_KINDS or parts[1] not in SCALINGS:
        raise EpiflowError(f"unknown LSI recipe {recipe!r}", field="lsi_recipe",
                           fix=f"use TFIDF+SCALE with TFIDF in {TFIDF_KINDS} and SCALE in {SCALINGS}, "
                               f"e.g. {DEFAULT_RECIPE}")
    return parts[0], parts[1]


def scale_components(emb: np.ndarray, scaling: str) -> np.ndarray:
    """Scale LSI cell coordinates (``us``: unchanged, ``zscore``: per component, ``l2``: per cell)."""
    emb = np.asarray(emb, dtype=np.float64)
    if scaling == "zscore":
        sd = emb.std(axis=0, ddof=1) if emb.shape[0] > 1 else np.ones(emb.shape[1])
        return (emb - emb.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    if scaling == "l2":
        n = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.where(n > 0, n, 1.0)
    return emb


def tfidf_lsi_matrix(counts, kind: str = "log") -> sp.csr_matrix:
    """The TF-IDF matrix of step 1-2 above (CSR float32, cells x features); ``kind`` see the recipes."""
    if kind not in TFIDF_KINDS:
        raise EpiflowError(f"unknown TF-IDF kind {kind!r}", field="lsi_recipe", fix=f"use one of {TFIDF_KINDS}")
    x = binarize(counts)
    n_cells = x.shape[0]
    depth = np.asarray(x.sum(axis=1)).ravel()
    df = np.bincount(x.indices, minlength=x.shape[1]).astype(np.float64)
    rows = np.repeat(np.arange(n_cells), np.diff(x.indptr))
    with np.errstate(divide="ignore", invalid="ignore"):
        tf = x.data / depth[rows]
        if kind == "signac":
            x.data = np.log1p(tf * (n_cells / df)[x.indices] * 1e4).astype(np.float32)
            return x
    idf = np.log1p(n_cells / (1.0 + df))
    v = tf * idf[x.indices]
    x.data = (np.log1p(v * 1e4) if kind == "log" else v).astype(np.float32)
    return x


def lsi(counts_csr, n_components: int = 50, drop_first="auto", seed: int = 0, *, return_info: bool = False,
        recipe: str | None = None):
    """LSI embedding of a cells x features count matrix (see the module docstring).

    Parameters
    ----------
    counts_csr : scipy sparse or dense array, cells x features, raw (or binary) counts
    n_components : number of SVD components computed (30-50 is usual); clipped to
        ``min(n_cells, n_features) - 1`` with a warning when larger
    drop_first : ``'auto'`` (drop if ``|rho(comp1, depth)| > 0.9``), ``True`` or ``False``
    seed : ``random_state`` of the randomized SVD
    return_info : also return ``{'depth_spearman', 'dropped_first', 'n_components',
        'explained_variance_ratio', 'recipe'}``
    recipe : ``'TFIDF+SCALE'`` (module docstring); None = :data:`DEFAULT_RECIPE`

    Returns
    -------
    np.ndarray float32, cells x (n_components or n_components - 1) [, info dict]
    """
    from scipy.stats import spearmanr
    from sklearn.decomposition import TruncatedSVD

    if drop_first not in ("auto", True, False):
        raise EpiflowError(f"drop_first must be 'auto', True or False, got {drop_first!r}", field="drop_first")
    kind, scaling = parse_recipe(recipe)
    if not sp.issparse(counts_csr):
        counts_csr = sp.csr_matrix(np.asarray(counts_csr))
    if counts_csr.ndim != 2:
        raise EpiflowError("counts must be a 2-d cells x features matrix", field="counts")
    n_cells, n_feat = counts_csr.shape
    x = tfidf_lsi_matrix(counts_csr, kind)
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
    out = np.ascontiguousarray(scale_components(emb[:, 1:] if drop else emb, scaling), dtype=np.float32)
    if return_info:
        return out, {"depth_spearman": rho, "dropped_first": drop, "n_components": int(out.shape[1]),
                     "explained_variance_ratio": svd.explained_variance_ratio_.tolist(),
                     "recipe": f"{kind}+{scaling}"}
    return out
