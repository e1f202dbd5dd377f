"""SnapATAC2 (Zhang et al., Nature Methods 2024): feature selection + spectral embedding, and its
mutual-nearest-centroid batch correction for integration, and a linear SVM on the spectral embedding for
annotation (``SnapATAC2+SVM``). Runs in the tool's own environment
(``envs/baseline-snapatac2.yaml``); the input is the plain cell x cCRE count matrix of the task's cells,
as LSI gets it."""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp

from ...errors import EpiflowError
from ..base import BaselineOutput


def fit_snapatac2(adata, task: str, params: dict) -> BaselineOutput:
    """``snap.pp.select_features`` (its defaults: the most accessible features, the top and bottom 0.5 %
    left out) then ``snap.tl.spectral`` (``n_comps`` components, cosine similarity, its default); for
    integration ``snap.pp.mnc_correct`` (mutual nearest centroids) on obs['batch'].

    Annotation: the spectral embedding of all the task's cells (unsupervised; no label is read), each
    component scaled to unit s.d. over the reference cells, then scikit-learn's ``LinearSVC`` (param C,
    default 1) fitted on the reference cells (obs['split'] == 'reference') predicts every cell. Unlike
    LSI+SVM, whose LSI is fitted on the reference cells and projects the query, the spectral embedding
    is computed with the query cells in it (SnapATAC2 has no projection of new cells onto an embedding;
    its usual route is to embed everything)."""
    import anndata as ad
    import snapatac2 as snap

    x = sp.csr_matrix(adata.X, dtype=np.float32)
    if x.shape[0] < 3 or x.shape[1] < 3:
        raise EpiflowError(f"need at least 3 cells and 3 features, got {x.shape}", field="X")
    a = ad.AnnData(X=x, obs=adata.obs[[]].copy())
    a.var_names = [str(v) for v in adata.var_names]
    threads = int(params.get("threads", os.environ.get("OMP_NUM_THREADS", 1)) or 1)
    seed = int(params.get("seed", 0))
    n_comps = int(max(2, min(int(params.get("n_components", 30)), x.shape[0] - 2, x.shape[1] - 2)))
    snap.pp.select_features(a, n_features=int(params.get("n_features", 500_000)), n_jobs=threads, verbose=False)
    n_sel = int(np.asarray(a.var["selected"]).sum())
    snap.tl.spectral(a, n_comps=n_comps, random_state=seed, num_threads=threads)
    emb = np.asarray(a.obsm["X_spectral"], dtype=np.float32)
    info = {"n_features_selected": n_sel, "n_comps": n_comps, "snapatac2": getattr(snap, "__version__", "")}
    if task == "integration":
        if "batch" not in adata.obs:
            raise EpiflowError("SnapATAC2 integration needs obs['batch']", field="obs/batch", fix="pass --batch-key")
        a.obs["batch"] = adata.obs["batch"].astype(str).to_numpy()
        snap.pp.mnc_correct(a, batch="batch", use_rep="X_spectral", key_added="X_corrected", n_jobs=threads)
        info["correction"] = "mnc_correct"
        emb = np.asarray(a.obsm["X_corrected"], dtype=np.float32)
    if task == "annotation":
        from .light import _reference, svm_labels

        ref, y = _reference(adata)
        return BaselineOutput(labels=svm_labels(emb, ref, y, params, seed), info={**info, "classifier": "LinearSVC"})
    return BaselineOutput(embedding=emb, info=info)
