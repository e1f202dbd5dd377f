"""Clustering of embeddings and agreement with known labels (SPEC §5, feature extraction).

* :func:`knn_graph` — scanpy's kNN graph (UMAP connectivities) of an embedding.
* :func:`leiden_bisect` — Leiden (``flavor="igraph"``) with the resolution bisected until the number of
  clusters equals the number of cell types, as in the EpiAgent paper. When that number cannot be reached
  (e.g. the graph has more connected components than wanted clusters, or more clusters are asked for than
  there are cells) the clustering whose count is closest is returned with ``reached=False``.
* :func:`clustering_scores` — NMI and ARI from scikit-learn.
* :func:`label_silhouette` — the scIB "cell-type ASW": silhouette of the labels on the embedding,
  rescaled to ``(asw + 1) / 2`` (1 = perfectly separated, 0.5 = random).
* :func:`embedding_scores` — the feature-extraction scores of one embedding (the three above): the
  EpiAgent task and every baseline are scored by it.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import EpiflowError

log = logging.getLogger(__name__)

_REP = "X_emb"

# umap-learn and pynndescent jit-compile their numba kernels without numba's on-disk cache, which costs
# 10-15 s in every new process that builds a kNN graph (most workflow jobs, each on a few hundred cells)
# and about a minute for pynndescent (>= 8,192 cells). Their dispatchers are switched to numba's cache
# before the first compile, so only the first process on a machine pays it. Same code, same results.
_NUMBA_CACHED_MODULES = ("umap.umap_", "umap.layouts", "umap.spectral", "pynndescent.pynndescent_",
                         "pynndescent.utils", "pynndescent.rp_trees", "pynndescent.distances",
                         "pynndescent.sparse", "pynndescent.sparse_nndescent", "pynndescent.graph_utils")
_numba_cache_done = False


def enable_numba_cache() -> int:
    """Turn on numba's on-disk cache for the kernels of umap-learn and pynndescent (once per process).

    Returns how many dispatchers were switched. A module that is missing, or a kernel whose cache has no
    writable location, is left as it was (it compiles as before)."""
    global _numba_cache_done
    if _numba_cache_done or os.environ.get("EPIFLOW_NO_NUMBA_CACHE"):
        return 0
    _numba_cache_done = True
    try:
        import importlib
        import warnings

        from numba.core.errors import NumbaWarning
        from numba.core.registry import CPUDispatcher
    except Exception:  # noqa: BLE001 - numba absent or changed: nothing to speed up
        return 0
    # a kernel that holds dynamic globals (pynndescent's nn_descent) cannot be cached: numba says so
    # when it compiles it, and compiles it as before
    warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=NumbaWarning)
    n = 0
    for name in _NUMBA_CACHED_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001
            continue
        for obj in list(vars(mod).values()):
            if isinstance(obj, CPUDispatcher) and getattr(obj, "_cache", None) is not None:
                try:
                    if type(obj._cache).__name__ == "NullCache":
                        obj.enable_caching()
                        n += 1
                except Exception:  # noqa: BLE001 - no writable cache location for this kernel
                    pass
    log.debug("numba on-disk cache enabled for %d umap/pynndescent kernels", n)
    return n


def _as_adata(adata_or_embedding, use_rep: str | None):
    """Return (AnnData, rep) where rep names the representation for the kNN graph."""
    import anndata as ad

    if isinstance(adata_or_embedding, ad.AnnData):
        a = adata_or_embedding
        if use_rep is not None and use_rep != "X" and use_rep not in a.obsm:
            raise EpiflowError(f"embedding '{use_rep}' not found in obsm (have: {sorted(a.obsm)})",
                               field=f"obsm/{use_rep}", fix="pass the obsm key that holds the embedding")
        return a, use_rep
    x = np.asarray(adata_or_embedding, dtype=np.float32)
    if x.ndim != 2:
        raise EpiflowError(f"an embedding must be a 2-d array (cells x dims), got shape {x.shape}",
                           field="embedding")
    a = ad.AnnData(obs={"_": np.zeros(x.shape[0])})
    a.obsm[_REP] = x
    return a, _REP


def knn_graph(adata_or_embedding, *, use_rep: str | None = None, n_neighbors: int = 15, seed: int = 0,
              key_added: str | None = None):
    """Compute scanpy's kNN graph; returns the AnnData that holds it (a new one for an array input).

    For an AnnData input the graph is added in place (``uns[key_added or 'neighbors']``,
    ``obsp[...connectivities]``). ``use_rep`` names an ``obsm`` key (``None`` = scanpy's default).
    """
    import scanpy as sc

    enable_numba_cache()
    a, rep = _as_adata(adata_or_embedding, use_rep)
    n = a.n_obs
    if n < 3:
        raise EpiflowError(f"need at least 3 cells to build a kNN graph, got {n}", field="cells")
    k = int(min(n_neighbors, n - 1))
    if k < n_neighbors:
        log.warning("only %d cells: using %d neighbours instead of %d", n, k, n_neighbors)
    transformer = _nndescent_transformer(n, k, seed) if n >= _SCANPY_BRUTE_MAX else None
    sc.pp.neighbors(a, n_neighbors=k, use_rep=rep, random_state=seed, key_added=key_added,
                    transformer=transformer)
    return a


# scanpy builds the graph by brute force below this many cells (euclidean metric) and with
# pynndescent from here on (scanpy.neighbors.Neighbors._handle_transformer).
_SCANPY_BRUTE_MAX = 8192


def _nndescent_transformer(n_obs: int, n_neighbors: int, seed: int):
    """scanpy's own default kNN transformer for ``n_obs`` cells (pynndescent with UMAP's ``n_trees`` and
    ``n_iters``), returning a ``scipy.sparse.csr_matrix``.

    pynndescent >= 0.5.13 returns a ``csr_array``, on which scanpy 1.11's neighbour extraction calls
    ``getnnz``, a method scipy's sparse arrays do not have (scipy >= 1.15 dropped it from them):
    ``AttributeError: 'csr_array' object has no attribute 'getnnz'`` on every dataset of >= 8,192 cells.
    Converting the output keeps scanpy's graph identical (same parameters, same approximate search) on
    every version pair.
    """
    import scanpy as sc
    import scipy.sparse as sp
    from pynndescent import PyNNDescentTransformer

    class CsrMatrixNNDescent(PyNNDescentTransformer):
        def transform(self, X, y=None):
            return sp.csr_matrix(super().transform(X, y))

        def fit_transform(self, X, y=None, **fit_params):
            return sp.csr_matrix(super().fit_transform(X, y, **fit_params))

    return CsrMatrixNNDescent(n_neighbors=n_neighbors, metric="euclidean", metric_kwds={}, random_state=seed,
                              n_jobs=sc.settings.n_jobs, n_trees=min(64, 5 + round(n_obs ** 0.5 / 20.0)),
                              n_iters=max(5, round(np.log2(n_obs))))


def _leiden_once(a, resolution: float, seed: int, neighbors_key: str | None) -> np.ndarray:
    import scanpy as sc

    sc.tl.leiden(a, resolution=resolution, flavor="igraph", n_iterations=-1, directed=False,
                 random_state=seed, key_added="_leiden_bisect", neighbors_key=neighbors_key)
    labels = a.obs["_leiden_bisect"].astype(int).to_numpy()
    del a.obs["_leiden_bisect"]
    a.uns.pop("_leiden_bisect", None)
    return labels


def leiden_bisect(adata_or_embedding, n_clusters: int, *, n_neighbors: int = 15, seed: int = 0,
                  max_iter: int = 30, use_rep: str | None = None, neighbors_key: str | None = None,
                  recompute_neighbors: bool | None = None, resolution_start: float = 1.0,
                  resolution_max: float = 1e4, resolution_tol: float = 1e-4):
    """Leiden clustering with the resolution bisected until there are ``n_clusters`` clusters.

    Parameters
    ----------
    adata_or_embedding
        A cells x dims array, or an AnnData. For an AnnData the kNN graph is built on ``obsm[use_rep]``
        (added in place) unless it already has one under ``neighbors_key`` and ``recompute_neighbors``
        is not true (default: recompute when ``use_rep`` is given, reuse otherwise).
    n_clusters
        The wanted number of clusters (the number of cell types).
    max_iter
        The most Leiden runs in all (the doubling search for an upper resolution included).
    resolution_start, resolution_max, resolution_tol
        First resolution tried, the largest tried, and the bracket width at which bisection gives up.

    Returns
    -------
    labels : np.ndarray of int
        Cluster of each cell (0 .. n-1, largest cluster first, as scanpy numbers them).
    resolution : float
        The resolution that produced ``labels``.
    reached : bool
        Whether the number of clusters equals ``n_clusters``. When it is ``False`` the run whose count
        was closest (ties: the one tried first) is returned and a warning is logged.

    Search: start at ``resolution_start``; while there are too few clusters double the resolution (up
    to ``resolution_max``); once a resolution gives too many, bisect between the last too-few
    resolution (or 0) and it. Leiden uses ``flavor="igraph"`` (modularity), undirected, iterated to
    convergence (``n_iterations=-1``), with ``random_state=seed``;
    the number of clusters is close to, but not strictly, monotone in the resolution, which is why the
    search keeps the closest result seen rather than assuming monotonicity.
    """
    n_clusters = int(n_clusters)
    if n_clusters < 1:
        raise EpiflowError(f"n_clusters must be >= 1, got {n_clusters}", field="n_clusters")
    a, rep = _as_adata(adata_or_embedding, use_rep)
    key = neighbors_key or "neighbors"
    if recompute_neighbors is None:
        recompute_neighbors = rep is not None or key not in a.uns
    if recompute_neighbors:
        knn_graph(a, use_rep=rep, n_neighbors=n_neighbors, seed=seed, key_added=neighbors_key)

    tried: dict[float, np.ndarray] = {}

    def run(res: float) -> int:
        labels = _leiden_once(a, res, seed, neighbors_key)
        tried[res] = labels
        m = int(labels.max()) + 1 if labels.size else 0
        log.debug("leiden resolution %.6g -> %d clusters (want %d)", res, m, n_clusters)
        return m

    def result(reached: bool):
        # closest count; ties -> the first resolution tried
        best = min(tried, key=lambda r: abs(int(tried[r].max()) + 1 - n_clusters))
        if not reached:
            got = int(tried[best].max()) + 1
            log.warning("Leiden bisection could not reach %d clusters in %d runs (closest: %d clusters "
                        "at resolution %.4g)", n_clusters, len(tried), got, best)
        return tried[best], float(best), reached

    lo, hi = 0.0, None
    res = float(resolution_start)
    it = 0
    # bracket: find hi with >= n_clusters clusters (doubling), lo with < n_clusters
    while it < max_iter:
        m = run(res)
        it += 1
        if m == n_clusters:
            return tried[res], res, True
        if m > n_clusters:
            hi = res
            break
        lo = res
        if res >= resolution_max:
            return result(False)
        res = min(res * 2.0, resolution_max)
    if hi is None:
        return result(False)
    while it < max_iter:
        res = 0.5 * (lo + hi)
        m = run(res)
        it += 1
        if m == n_clusters:
            return tried[res], res, True
        if m > n_clusters:
            hi = res
        else:
            lo = res
        if hi - lo < resolution_tol:
            break
    return result(False)


def clustering_scores(labels_true, labels_pred) -> dict[str, float]:
    """``{'NMI': ..., 'ARI': ...}`` of a clustering against known labels (scikit-learn).

    NMI is ``normalized_mutual_info_score`` with the arithmetic mean normaliser (sklearn's default,
    the scIB definition); ARI is ``adjusted_rand_score``.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    t = np.asarray(labels_true)
    p = np.asarray(labels_pred)
    if t.shape[0] != p.shape[0]:
        raise EpiflowError(f"labels have {t.shape[0]} cells but the clustering has {p.shape[0]}",
                           field="labels")
    return {"NMI": float(normalized_mutual_info_score(t, p)), "ARI": float(adjusted_rand_score(t, p))}


def label_silhouette(embedding, labels, *, rescale: bool = True, seed: int = 0,
                     sample_size: int | None = 20000) -> float:
    """Silhouette width of ``labels`` on ``embedding`` (Euclidean), scIB-rescaled to [0, 1] by default.

    On more than ``sample_size`` cells a random subsample (``seed``) is scored.
    """
    from sklearn.metrics import silhouette_score

    x = np.asarray(embedding, dtype=np.float64)
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        raise EpiflowError("the silhouette needs at least two labels", field="labels")
    kw = {}
    if sample_size is not None and x.shape[0] > sample_size:
        kw = dict(sample_size=sample_size, random_state=seed)
    s = float(silhouette_score(x, y, metric="euclidean", **kw))
    return (s + 1.0) / 2.0 if rescale else s


def embedding_scores(adata_or_embedding, labels, *, n_neighbors: int = 15, seed: int = 0, max_iter: int = 30,
                     use_rep: str | None = None) -> tuple[dict, np.ndarray]:
    """The feature-extraction scores of one embedding of labelled cells (``labels``: one per row):
    :func:`leiden_bisect` to the number of cell types, then ``NMI``, ``ARI``, ``ASW_cell_type``,
    ``n_clusters``, ``n_cell_types``, ``leiden_reached`` and ``leiden_resolution``. Returns
    ``(values, Leiden labels)``. ``adata_or_embedding``: an array, or an AnnData whose ``obsm[use_rep]``
    holds it (its kNN graph is added there, for a UMAP after). One function for EpiAgent's task
    (:func:`epiflow.tasks.features.run`) and the baselines
    (:func:`epiflow.baselines.run.evaluate`), so their rows are computed alike."""
    y = np.asarray(labels).astype(str)
    x = adata_or_embedding.obsm[use_rep] if use_rep is not None else adata_or_embedding
    n_types = int(len(np.unique(y)))
    pred, res, reached = leiden_bisect(adata_or_embedding, n_types, n_neighbors=n_neighbors, seed=seed,
                                       max_iter=max_iter, use_rep=use_rep)
    s = clustering_scores(y, pred)
    return {"NMI": s["NMI"], "ARI": s["ARI"], "ASW_cell_type": label_silhouette(x, y, seed=seed),
            "n_clusters": int(pred.max()) + 1, "n_cell_types": n_types, "leiden_reached": int(reached),
            "leiden_resolution": float(res)}, pred
