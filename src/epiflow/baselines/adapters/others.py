"""Adapters of the tools with their own heavy stacks (each runs in ``envs/baseline-<tool>.yaml``).

Every adapter keeps all cells and features of the canonical input (the tools' own cell / feature
filters are switched off: the task's preprocessing has already been applied by
:func:`epiflow.baselines.run.canonical_input`), and maps the tool's output back to the input order.
Tools that could not be installed or run here keep a stub that raises a clear error naming the
reason (see ``docs/baselines.md``).
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import EpiflowError
from ..base import BaselineOutput

log = logging.getLogger(__name__)


def _binary_adata(adata, batch: bool):
    import anndata as ad

    x = sp.csr_matrix(adata.X, dtype=np.float32, copy=True)
    x.eliminate_zeros()
    x.data[:] = 1.0
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    obs["batch"] = adata.obs["batch"].astype(str).to_numpy() if batch and "batch" in adata.obs else "b0"
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"f{i}" for i in range(adata.n_vars)]))
    return a


def _align(out_adata, key: str, names) -> np.ndarray:
    idx = pd.Index(out_adata.obs_names.astype(str)).get_indexer(pd.Index(names).astype(str))
    if (idx < 0).any():
        raise EpiflowError(f"the tool dropped {int((idx < 0).sum())} cells", field="cells")
    return np.asarray(out_adata.obsm[key], np.float32)[idx]


def fit_scalex(adata, task: str, params: dict) -> BaselineOutput:
    """SCALEX (``scalex.SCALEX``, profile ATAC); batch = ``obs['batch']`` for integration, one batch
    otherwise; no cell / feature filtering; the embedding is ``obsm['latent']``."""
    from scalex import SCALEX

    a = _binary_adata(adata, batch=task == "integration")
    iters = int(params.get("max_iteration", 30000))
    with tempfile.TemporaryDirectory() as td:
        res = SCALEX(a, batch_name="batch", profile="ATAC", min_features=0, min_cells=0,
                     n_top_features=params.get("n_top_features"), max_iteration=iters,
                     batch_size=int(params.get("batch_size", 64)), lr=float(params.get("lr", 2e-4)),
                     seed=int(params.get("seed", 0)), outdir=td, ignore_umap=True, show=False, num_workers=0,
                     verbose=False)
    emb = _align(res, "latent", adata.obs_names)
    return BaselineOutput(embedding=emb, info={"max_iteration": iters})


def fit_scale(adata, task: str, params: dict) -> BaselineOutput:
    """SCALE (``scale-atac``): its ATAC preprocessing without cell / peak filters, the GMM-VAE with the
    defaults of its command line (latent 10, encoder 1024-128, ``n_centroids`` = number of clusters
    wanted, default 30), embedding = the latent means ``z``."""
    import warnings

    import torch

    if not hasattr(np, "warnings"):  # scale-atac 1.1.0 calls np.warnings (removed in numpy 1.24)
        np.warnings = warnings
    from scale import SCALE
    from scale.dataset import load_dataset

    seed = int(params.get("seed", 0))
    np.random.seed(seed)
    torch.manual_seed(seed)
    a = _binary_adata(adata, batch=False)
    bs = int(params.get("batch_size", 32))
    k = int(params.get("n_centroids", 30))
    iters = int(params.get("max_iter", 30000))
    with tempfile.TemporaryDirectory() as td:
        path = os.path.join(td, "input.h5ad")  # scale-atac only reads files
        a.write_h5ad(path)
        data, trainloader, testloader = load_dataset([path], min_genes=0, min_cells=0, batch_size=bs,
                                                     n_top_genes=int(params.get("n_top_features", 30000)))
        dims = [data.shape[1], int(params.get("latent", 10)), [1024, 128], []]
        model = SCALE(dims, n_centroids=k)
        model.init_gmm_params(testloader)
        model.fit(trainloader, lr=float(params.get("lr", 2e-4)), weight_decay=5e-4, verbose=False, device="cpu",
                  max_iter=iters, outdir=td + os.sep)
    data.obsm["latent"] = model.encodeBatch(testloader, device="cpu", out="z")
    return BaselineOutput(embedding=_align(data, "latent", adata.obs_names),
                          info={"max_iter": iters, "n_centroids": k, "n_features_used": int(data.shape[1])})


def _not_available(tool: str, reason: str):
    def fit(adata, task, params):
        raise EpiflowError(f"{tool}: {reason}", fix="see docs/baselines.md (status table)")
    fit.__name__ = f"fit_{tool}"
    return fit


# Tools whose adapter is not available here; the reasons are those found when installing / running
# them on Python 3.11 (docs/baselines.md).
fit_castle = _not_available("castle", "sccastle 1.0.2 does not install (it requires the PyPI package 'umap', which has no installable release)")
fit_cellcano = _not_available("cellcano", "install not attempted yet (TensorFlow stack)")
fit_scopen = _not_available("scopen", "scopen 1.0.1 does not build on Python 3.11 (C extension needs longintrepr.h)")
fit_sccase = _not_available("sccase", "install not attempted yet")
fit_scgen = _not_available("scgen", "scgen 2.1.0 does not import with scvi-tools >= 1 (no scvi._compat)")
fit_scpram = _not_available("scpram", "scpram needs torchaudio==0.13.1 / torch 1.x: not installable with torch 2.13.0")
fit_gears = _not_available("gears", "cell-gears 0.1.2 does not import (torch_geometric missing) and downloads data at run time")
