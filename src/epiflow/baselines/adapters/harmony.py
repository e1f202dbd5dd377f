"""Harmony (``harmonypy``) on the PCA of the log-normalised counts, corrected for ``obs['batch']``."""

from __future__ import annotations

import numpy as np

from ...errors import EpiflowError
from ..base import BaselineOutput
from .light import fit_pca


def fit_harmony(adata, task: str, params: dict) -> BaselineOutput:
    import harmonypy

    if "batch" not in adata.obs:
        raise EpiflowError("Harmony needs obs['batch']", field="obs/batch", fix="pass --batch-key")
    pca = fit_pca(adata, task, params)
    pcs = pca.embedding.astype(np.float64)
    meta = adata.obs[["batch"]].astype(str).reset_index(drop=True)
    ho = harmonypy.run_harmony(pcs, meta, ["batch"], max_iter_harmony=int(params.get("max_iter", 10)),
                               random_state=int(params.get("seed", 0)), verbose=False)
    z = np.asarray(ho.Z_corr)
    if z.shape[0] != adata.n_obs:  # harmonypy < 2 returns dims x cells
        z = z.T
    return BaselineOutput(embedding=z.astype(np.float32),
                          info={**pca.info, "harmonypy": getattr(harmonypy, "__version__", "")})
