"""Adapters of the tools with their own heavy stacks (each runs in ``envs/baseline-<tool>.yaml``).

Every adapter keeps all cells and features of the canonical input (the tools' own cell / feature
filters are switched off: the task's preprocessing has already been applied by
:func:`epiflow.baselines.run.canonical_input`), and maps the tool's output back to the input order.
Where a tool needs a compatibility step on Python 3.11 (pins, ``--no-deps`` installs, a patched
build, a run-time alias), the step is in its ``envs/baseline-<tool>.yaml`` / ``.post-deploy.sh``
or, for run-time aliases, in the adapter below, and ``docs/baselines.md`` lists it.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import EpiflowError
from ...tokenize.core import binarize
from ..base import BaselineOutput

log = logging.getLogger(__name__)


def _binary_adata(adata, batch: bool):
    import anndata as ad

    x = binarize(adata.X)
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
    import torch

    _shim_numpy_warnings()  # scale-atac 1.1.0 calls np.warnings
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


def _shim_numpy_warnings():
    """``numpy.warnings`` was removed in numpy 1.24; sccastle and scale-atac still call it."""
    import warnings

    if not hasattr(np, "warnings"):
        np.warnings = warnings


class _chdir:
    """Run a tool that writes files into its working directory inside a temporary folder."""

    def __enter__(self):
        self._old = os.getcwd()
        self._td = tempfile.TemporaryDirectory(prefix="epiflow-tool-")
        os.chdir(self._td.name)
        return self._td.name

    def __exit__(self, *exc):
        os.chdir(self._old)
        self._td.cleanup()


def fit_castle(adata, task: str, params: dict) -> BaselineOutput:
    """CASTLE (``sccastle.CASTLE``, reference 0 = unsupervised; no labels are passed): its own
    preprocessing (binarise, TF-IDF, normalise, max-min scale) with the cell filter off and the
    feature filter at ``min_cells=1`` (its TF-IDF divides by each feature's count: a feature open in
    no cell gives NaN); batch = ``obs['batch']`` for integration (CASTLE's batch loss), one batch
    otherwise; the embedding is the quantised latent ``obsm['latent']``. The data loader's worker
    processes are switched off (sccastle hard-codes ``num_workers=8``)."""
    _shim_numpy_warnings()
    import sccastle
    import sccastle.data as cdata

    if not getattr(cdata.DataLoader, "_epiflow", False):
        orig = cdata.DataLoader

        def _loader(*a, **kw):
            kw["num_workers"] = 0
            return orig(*a, **kw)
        _loader._epiflow = True
        cdata.DataLoader = _loader
    a = _binary_adata(adata, batch=task == "integration")
    max_epoch = int(params.get("max_epoch", 500))
    iters = int(params.get("max_iteration", 100000))
    with tempfile.TemporaryDirectory() as td:
        path = os.path.join(td, "input.h5ad")  # CASTLE reads files only
        a.write_h5ad(path)
        res = sccastle.CASTLE([path], batch_name="batch", min_features=0, min_cells=1,
                              latent_dim=int(params.get("latent_dim", 50)), n_embed=int(params.get("n_embed", 400)),
                              split=int(params.get("split", 10)), batch_size=params.get("batch_size"),
                              lr=float(params.get("lr", 1e-4)), max_iteration=iters, max_epoch=max_epoch,
                              seed=int(params.get("seed", 124)), outdir=td + os.sep, ignore_umap=True, show=False,
                              verbose=False)
    return BaselineOutput(embedding=_align(res, "latent", adata.obs_names),
                          info={"max_epoch": max_epoch, "max_iteration": iters, "n_features_used": int(res.n_vars)})


def fit_sccase(adata, task: str, params: dict) -> BaselineOutput:
    """scCASE (``scCASE.run``, method ``scCASE``) on the binarised counts: its peak filter is off
    (``threshold=0``: the task's >= 3 % filter was applied by :func:`epiflow.baselines.run.canonical_input`),
    TF-IDF, ``K`` = the number of components (``'Auto'``: scCASE's own estimate with its Aster
    ensemble over ``type_number_range``), the imputed matrix (min-max scaled as scCASE returns it)
    in the input's cell and feature order. Memory grows with cells^2 (cell-cell similarity)."""
    _shim_numpy_warnings()
    import anndata as ad
    from scCASE import main as sccase

    x = binarize(adata.X)
    a = ad.AnnData(X=x, obs=pd.DataFrame(index=adata.obs_names.astype(str)),
                   var=pd.DataFrame(index=[f"f{i}" for i in range(adata.n_vars)]))
    k = params.get("K", "Auto")
    lo, hi = params.get("type_number_range", [3, 15])
    with _chdir():
        res = sccase.run(a, method="scCASE", data_format="h5ad", threshold=0.0, K=k,
                         type_number_range=range(int(lo), int(hi)), save_result=False)
    if res.n_vars != adata.n_vars:
        raise EpiflowError(f"scCASE returned {res.n_vars} features for {adata.n_vars}", field="features")
    idx = pd.Index(res.obs_names.astype(str)).get_indexer(adata.obs_names.astype(str))
    if (idx < 0).any():
        raise EpiflowError(f"scCASE dropped {int((idx < 0).sum())} cells", field="cells")
    imp = np.asarray(res.X, np.float32)[idx]
    return BaselineOutput(imputed=imp, features=np.arange(adata.n_vars),
                          info={"K": k if k != "Auto" else int(res.obsm["Embeding"].shape[1])})


def fit_scopen(adata, task: str, params: dict) -> BaselineOutput:
    """scOpen (``scopen.Main``): binarise, its TF-IDF, its regularised NMF (``n_components`` 30,
    ``alpha`` 1, ``max_iter`` 500, ``init`` nndsvd, ``random_state`` 42: its command-line defaults),
    imputed = ``W @ H`` (peaks x cells, transposed back). ``estimate_rank=True`` picks the rank by
    the knee of the fitting error over ``min_n_components..max_n_components`` as its
    ``--estimate_rank`` does."""
    from scopen import Main as so

    x = binarize(adata.X)
    tf_idf = so.tf_idf_transform(x.T.tocsr())
    alpha = float(params.get("alpha", 1.0))
    iters = int(params.get("max_iter", 500))
    seed = int(params.get("random_state", 42))
    init = params.get("init", "nndsvd")
    if params.get("estimate_rank"):
        from kneed import KneeLocator

        ks = np.arange(int(params.get("min_n_components", 2)), int(params.get("max_n_components", 30)) + 1,
                       int(params.get("step_n_components", 1)))
        fits = {int(k): so.run_nmf((tf_idf, int(k), alpha, iters, 0, seed, init)) for k in ks}
        knee = KneeLocator(ks, [fits[int(k)][2] for k in ks], S=1.0, curve="convex", direction="decreasing").knee
        n_comp = int(knee) if knee is not None else int(ks[-1])
        w_hat, h_hat, err = fits[n_comp]
    else:
        n_comp = int(params.get("n_components", 30))
        w_hat, h_hat, err = so.run_nmf((tf_idf, n_comp, alpha, iters, 0, seed, init))
    imp = np.asarray(np.dot(w_hat, h_hat), np.float32).T
    return BaselineOutput(imputed=imp, features=np.arange(adata.n_vars),
                          info={"n_components": n_comp, "max_iter": iters, "reconstruction_err": float(err)})


def _scgen_compat() -> list[str]:
    """scgen 2.1.0 (the last release) was written for scvi-tools 0.15-0.19. Three renames in
    scvi-tools >= 1.0 are bridged here (returns what was bridged; recorded in the output's info):
    ``scvi._compat.Literal`` (now ``typing.Literal``) and ``scvi.module.base.LossRecorder``
    (renamed ``LossOutput``, same fields as keywords) are aliased before scgen is imported, and the
    inference outputs ``qz_m`` / ``qz_v`` of scgen's VAE are also returned under the keys
    ``qzm`` / ``qzv`` that ``get_latent_representation`` of scvi-tools >= 1.0 reads."""
    import importlib.util
    import sys
    import types
    import typing

    import scvi.module.base as mb

    done = []
    if "scvi._compat" not in sys.modules and importlib.util.find_spec("scvi._compat") is None:
        mod = types.ModuleType("scvi._compat")
        mod.Literal = typing.Literal
        sys.modules["scvi._compat"] = mod
        done.append("scvi._compat.Literal=typing.Literal")
    if not hasattr(mb, "LossRecorder"):
        def loss_recorder(loss, reconstruction_loss, kl_local, kl_global=None, **kw):
            extra = {} if kl_global is None else {"kl_global": kl_global}
            return mb.LossOutput(loss=loss, reconstruction_loss=reconstruction_loss, kl_local=kl_local, **extra, **kw)
        mb.LossRecorder = loss_recorder
        done.append("scvi.module.base.LossRecorder=LossOutput")
    from scgen import _scgenvae

    vae = _scgenvae.SCGENVAE
    if not getattr(vae.inference, "_epiflow", False):
        inference = vae.inference

        def inference_with_keys(self, *a, **kw):
            out = inference(self, *a, **kw)
            out.setdefault("qzm", out["qz_m"])
            out.setdefault("qzv", out["qz_v"])
            return out
        inference_with_keys._epiflow = True
        vae.inference = inference_with_keys
        done.append("SCGENVAE.inference: +qzm/qzv keys")
    return done


def _perturbation_frame(adata):
    """Binarised AnnData with ``obs['condition']`` (control / perturbed) and ``obs['label']``."""
    import anndata as ad

    for c in ("condition", "label"):
        if c not in adata.obs:
            raise EpiflowError(f"perturbation input needs obs['{c}']", field=f"obs/{c}")
    x = binarize(adata.X)
    obs = pd.DataFrame({"condition": adata.obs["condition"].astype(str).to_numpy(),
                        "label": adata.obs["label"].astype(str).to_numpy()},
                       index=adata.obs_names.astype(str))
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"f{i}" for i in range(adata.n_vars)]))
    holdout = str(adata.uns.get("holdout", ""))
    if not holdout:
        raise EpiflowError("perturbation input needs uns['holdout'] (the cell type to predict)", field="uns/holdout")
    ctrl = (obs["label"].to_numpy() == holdout) & (obs["condition"].to_numpy() == "control")
    if not ctrl.any():
        raise EpiflowError(f"no control cell of the held-out type '{holdout}'", field="obs/label")
    return a, holdout, ctrl


def fit_scgen(adata, task: str, params: dict) -> BaselineOutput:
    """scGen (``scgen.SCGEN``) on the binarised top-accessible cCREs (the task keeps the top-50,000):
    ``setup_anndata(batch_key='condition', labels_key='label')``, train (its defaults: 800 hidden,
    latent 100, early stopping on the validation loss, ``max_epochs`` default 100 here), then
    ``predict(ctrl_key='control', stim_key='perturbed', celltype_to_predict=holdout)``: the
    held-out type's control cells shifted by the latent perturbation vector and decoded."""
    import torch

    compat = _scgen_compat()
    import scgen

    seed = int(params.get("seed", 0))
    np.random.seed(seed)
    torch.manual_seed(seed)
    a, holdout, _ = _perturbation_frame(adata)
    a.X = a.X.toarray()  # scGen's predict() feeds .X to torch.Tensor
    scgen.SCGEN.setup_anndata(a, batch_key="condition", labels_key="label")
    model = scgen.SCGEN(a, n_hidden=int(params.get("n_hidden", 800)), n_latent=int(params.get("n_latent", 100)))
    epochs = int(params.get("max_epochs", 100))
    model.train(max_epochs=epochs, batch_size=int(params.get("batch_size", 32)),
                early_stopping=bool(params.get("early_stopping", True)),
                early_stopping_patience=int(params.get("early_stopping_patience", 25)),
                accelerator=params.get("accelerator", "cpu"), enable_progress_bar=False)
    pred, delta = model.predict(ctrl_key="control", stim_key="perturbed", celltype_to_predict=holdout)
    hist = model.history.get("elbo_train") if hasattr(model, "history") else None
    return BaselineOutput(predicted=np.asarray(pred.X, np.float32), features=np.arange(adata.n_vars),
                          info={"max_epochs": epochs, "epochs_run": int(len(hist)) if hist is not None else None,
                                "holdout": holdout, "n_predicted": int(pred.n_obs), "compat": compat,
                                "scgen": getattr(scgen, "__version__", "")})


def fit_scpram(adata, task: str, params: dict) -> BaselineOutput:
    """scPRAM (``scpram.models.SCPRAM``) on the binarised top-accessible cCREs: its VAE (latent 100,
    hidden 1000, noise 0.1, KL weight 5e-4: its defaults) trained ``epochs`` (default 100) on every
    cell except the held-out type's perturbed ones, then ``predict(...)``: optimal-transport matching
    of perturbed to control cells of the other types in the latent space, attention-weighted
    perturbation vector added to the held-out type's control cells, decoded."""
    import torch
    from scpram import models

    seed = int(params.get("seed", 0))
    np.random.seed(seed)
    torch.manual_seed(seed)
    a, holdout, _ = _perturbation_frame(adata)
    a.X = a.X.toarray()
    device = torch.device(params.get("device", "cpu"))
    model = models.SCPRAM(input_dim=a.n_vars, latent_dim=int(params.get("latent_dim", 100)),
                          hidden_dim=int(params.get("hidden_dim", 1000)), noise_rate=float(params.get("noise_rate", 0.1)),
                          kl_weight=float(params.get("kl_weight", 5e-4)), device=device).to(device)
    epochs = int(params.get("epochs", 100))
    model.train_SCPRAM(a, epochs=epochs, batch_size=int(params.get("batch_size", 128)), lr=float(params.get("lr", 5e-4)))
    model.eval()
    keys = {"condition_key": "condition", "cell_type_key": "label", "ctrl_key": "control", "stim_key": "perturbed",
            "pred_key": "predicted"}
    with torch.no_grad():
        pred = model.predict(train_adata=a, cell_to_pred=holdout, key_dic=keys, ratio=float(params.get("ratio", 0.05)))
    return BaselineOutput(predicted=np.asarray(pred.X, np.float32), features=np.arange(adata.n_vars),
                          info={"epochs": epochs, "holdout": holdout, "n_predicted": int(pred.n_obs)})


def fit_cellcano(adata, task: str, params: dict) -> BaselineOutput:
    """Cellcano (``Cellcano`` 1.0.4, TensorFlow) on gene-activity scores of the features (epiflow's
    gene body + 2 kb upstream scores when ``params['genes']`` names a BED6 gene file, standing in for
    the ArchR gene scores that Cellcano's own ``preprocess`` computes through R; the binarised
    features otherwise). Its ``train`` then ``predict`` steps with its defaults: normalise + log1p,
    F-test selection of 3,000 features on the reference, center-scale, ``model='MLP'`` (or ``'KD'``)
    trained on the reference; the query is scaled with its own statistics when it has >= 1,000
    cells (else with the reference's) and, with >= 1,000 query cells, gets Cellcano's second round
    (knowledge distillation on the low-entropy query cells, relabelling the high-entropy ones)."""
    import anndata as ad
    import tensorflow as tf
    from Cellcano.utils import _utils as cu
    from sklearn.preprocessing import OneHotEncoder

    from ..preprocess import feature_coords, gene_activity

    if "split" not in adata.obs or "label" not in adata.obs:
        raise EpiflowError("annotation needs obs['split'] and obs['label']", field="obs")
    split = adata.obs["split"].astype(str).to_numpy()
    ref, query = np.flatnonzero(split == "reference"), np.flatnonzero(split == "query")
    x = sp.csr_matrix(adata.X, dtype=np.float32, copy=True)
    genes = params.get("genes")
    if genes:
        coords = feature_coords(adata.var)
        if coords is None:
            raise EpiflowError("gene scores need feature coordinates", field="var")
        x, names = gene_activity(x, coords, genes, upstream=int(params.get("upstream", 2000)))
        names = [str(n) for n in names]
        source = "gene_activity"
    else:
        x = binarize(x)
        names = [f"F{i}" for i in range(x.shape[1])]
        source = "features"
    seed = int(params.get("seed", cu.RANDOM_SEED))
    tf.keras.utils.set_random_seed(seed)
    var = pd.DataFrame(index=names)
    train = ad.AnnData(X=x[ref], obs=pd.DataFrame({cu.Celltype_COLUMN: adata.obs["label"].astype(str).to_numpy()[ref]},
                                                  index=adata.obs_names[ref].astype(str)), var=var.copy())
    train = cu._process_adata(train, process_type="train")
    train = cu._select_feature(train, fs_method=params.get("fs", "F-test"),
                               num_features=int(params.get("num_features", 3000)))
    train = cu._scale_data(train)
    x_train = cu._extract_adata(train)
    enc = OneHotEncoder(handle_unknown="ignore")
    y_train = enc.fit_transform(train.obs[[cu.Celltype_COLUMN]]).toarray()
    classes = [str(c) for c in enc.categories_[0]]
    kind = params.get("model", "MLP")
    epochs = int(params.get("max_epochs", 100))
    if kind == "KD":
        teacher = cu._init_MLP(x_train, y_train, dims=cu.Teacher_DIMS, seed=cu.RANDOM_SEED)
        teacher.compile()
        teacher.fit(x_train, y_train, batch_size=cu.BATCH_SIZE, max_epochs=epochs)
        student = cu._init_MLP(x_train, y_train, dims=cu.Student_DIMS, seed=cu.RANDOM_SEED)
        model = cu._run_distiller(x_train, y_train, student_model=student.model, teacher_model=teacher.model).student
    elif kind == "MLP":
        mlp = cu._init_MLP(x_train, y_train, dims=cu.MLP_DIMS, seed=cu.RANDOM_SEED)
        mlp.compile()
        mlp.fit(x_train, y_train, max_epochs=epochs)
        model = mlp.model
    else:
        raise EpiflowError(f"Cellcano model must be MLP or KD, got {kind!r}", field="model")
    labels = adata.obs["label"].astype(str).to_numpy().copy()
    info = {"input": source, "n_genes": len(names), "n_features_used": int(train.n_vars), "model": kind,
            "max_epochs": epochs, "second_round": False}
    if query.size:
        test = ad.AnnData(X=x[query], obs=pd.DataFrame(index=adata.obs_names[query].astype(str)), var=var.copy())
        test = cu._process_adata(test, process_type="test")
        test = test[:, list(train.var_names)].copy()  # the reference's selected features, in its order
        if test.n_obs >= 1000:
            test_x = cu._extract_adata(cu._scale_data(test))
        else:
            test_x = (cu._extract_adata(test) - train.var["mean"].to_numpy()) / train.var["std"].to_numpy()
        enc_map = dict(enumerate(classes))
        y_pred = tf.nn.softmax(model.predict(test_x, verbose=0)).numpy()
        pred = np.asarray(cu._prob_to_label(y_pred, enc_map), dtype=object)
        if test.n_obs >= 1000 and not params.get("oneround", False):
            entropy = -np.nansum(y_pred * np.log(y_pred), axis=1)
            test.obs["firstround"] = pred
            test.obs["entropy"] = entropy
            test = cu._select_confident_cells(test, celltype_col="firstround")
            low = test.obs["entropy_status"].to_numpy() == "low"
            tx = cu._label_to_onehot(list(pred[low]), encoders=enc_map)
            teacher = cu._init_MLP(test_x[low], tx, dims=cu.Teacher_DIMS, seed=cu.RANDOM_SEED)
            teacher.compile()
            teacher.fit(test_x[low], tx, batch_size=cu.BATCH_SIZE, max_epochs=epochs)
            student = cu._init_MLP(test_x[low], tx, dims=cu.Student_DIMS, seed=cu.RANDOM_SEED)
            dist = cu._run_distiller(test_x[low], tx, student_model=student.model, teacher_model=teacher.model)
            y2 = tf.nn.softmax(dist.student.predict(test_x[~low], verbose=0)).numpy()
            pred[~low] = cu._prob_to_label(y2, enc_map)
            info["second_round"] = True
        labels[query] = pred.astype(str)
    return BaselineOutput(labels=labels.astype(str), info=info)


def _gears_condition(label: str, control: str) -> str:
    """EpiAgent perturbation label -> GEARS condition (``ctrl``, ``A+ctrl``, ``A+B``)."""
    if label == control:
        return "ctrl"
    genes = [g.strip() for g in str(label).replace(",", "+").split("+") if g.strip()]
    return "+".join(genes) if len(genes) > 1 else f"{genes[0]}+ctrl"


def coexpression_edges(x: np.ndarray, *, threshold: float = 0.4, k: int = 20, block: int = 2048) -> pd.DataFrame:
    """GEARS's co-expression graph (``get_coexpression_network_from_train``: per feature the k + 1
    largest |Pearson| over the training cells, kept when > ``threshold``; edges source -> target)
    computed in row blocks: GEARS itself builds the dense features x features matrix (50,000^2
    values for the paper's input)."""
    x = np.asarray(x, np.float32)
    xc = x - x.mean(0, keepdims=True)
    norm = np.sqrt((xc ** 2).sum(0))
    norm[norm == 0] = np.inf
    z = xc / norm
    n = x.shape[1]
    kk = min(k + 1, n)
    src, dst, val = [], [], []
    for s0 in range(0, n, block):
        c = np.abs(z[:, s0:s0 + block].T @ z)  # block x n
        c[~np.isfinite(c)] = 0.0
        top = np.argpartition(-c, kk - 1, axis=1)[:, :kk]
        tv = np.take_along_axis(c, top, axis=1)
        rows = np.repeat(np.arange(s0, s0 + c.shape[0]), kk)
        ok = tv.ravel() > threshold
        src.append(top.ravel()[ok])
        dst.append(rows[ok])
        val.append(tv.ravel()[ok])
    return pd.DataFrame({"source": np.concatenate(src), "target": np.concatenate(dst),
                         "importance": np.concatenate(val)})


def fit_gears(adata, task: str, params: dict) -> BaselineOutput:
    """GEARS (``cell-gears`` 0.1.2 with ``torch-geometric``) for unseen genetic perturbations, on the
    binarised top-accessible cCREs as its "genes".

    GEARS downloads its GO data from Harvard Dataverse at run time; here everything is built
    offline: ``gene2go_all.pkl`` from ``params['go']`` (a gene_symbol / GO-id table such as
    ``../shared/data/go_bp_human.tsv.gz``), every annotated gene as a node of the perturbation graph
    (``gene_set_path``), and the two graphs GEARS would compute passed to ``model_initialize``:
    the GO graph (Jaccard of GO term sets > 0.1, top 20, plus self edges -- GEARS's ``make_GO``
    rule, computed by :func:`epiflow.genome.gene_graph.build_gene_graph`) and the co-expression
    graph of the training controls (:func:`coexpression_edges`). Split: GEARS ``custom`` with the
    training perturbations (validation: a seeded fifth of them when there are >= 5, else all);
    the held-out perturbations (``uns['heldout']``) are predicted with ``GEARS.predict`` (mean over
    the control cells). Defaults: hidden 64, ``epochs`` 20, lr 1e-3, batch 32."""
    import pickle

    import torch
    from gears import GEARS, PertData
    from gears.utils import GeneSimNetwork

    from ...genome.gene_graph import build_gene_graph, read_go_annotations

    go_path = params.get("go")
    if not go_path:
        raise EpiflowError("GEARS needs a gene-GO table: --param go=PATH (gene_symbol<TAB>go_id, e.g. "
                           "../shared/data/go_bp_human.tsv.gz); GEARS's own copy is a Harvard Dataverse download",
                           field="go")
    if "perturbation" not in adata.obs:
        raise EpiflowError("genetic input needs obs['perturbation']", field="obs/perturbation")
    control = str(adata.uns.get("control", "control"))
    held = [str(h) for h in np.atleast_1d(adata.uns.get("heldout", []))]
    if not held:
        raise EpiflowError("genetic input needs uns['heldout']", field="uns/heldout")
    seed = int(params.get("seed", 0))
    np.random.seed(seed)
    torch.manual_seed(seed)
    go = read_go_annotations(go_path)
    gene2go = {g: set(t) for g, t in go.groupby("gene")["go_id"]}
    lab = adata.obs["perturbation"].astype(str).to_numpy()
    cond = np.array([_gears_condition(v, control) for v in lab], dtype=object)
    pert_genes = sorted({g for c in cond if c != "ctrl" for g in c.split("+") if g != "ctrl"}
                        | {g for h in held for g in _gears_condition(h, control).split("+") if g != "ctrl"})
    missing = [g for g in pert_genes if g not in gene2go]
    if missing:
        raise EpiflowError(f"GEARS only perturbs genes of its GO graph; no GO annotation for {missing[:10]}",
                           field="perturbation", fix="give a GO table covering the perturbed genes")
    import anndata as ad

    x = binarize(adata.X)
    feat = [f"CCRE{i}" for i in range(adata.n_vars)]
    a = ad.AnnData(X=x, obs=pd.DataFrame({"condition": cond, "cell_type": "cell"}, index=adata.obs_names.astype(str)),
                   var=pd.DataFrame({"gene_name": feat}, index=feat))
    train_c = sorted(set(cond) - {"ctrl"})
    rng = np.random.default_rng(seed)
    val_c = sorted(rng.choice(train_c, max(1, len(train_c) // 5), replace=False).tolist()) if len(train_c) >= 5 else train_c
    fit_c = [c for c in train_c if c not in val_c] if len(train_c) >= 5 else train_c
    epochs = int(params.get("epochs", 20))
    with _chdir() as td:
        data_path = os.path.join(td, "gears_data")
        os.makedirs(data_path)
        with open(os.path.join(data_path, "gene2go_all.pkl"), "wb") as fh:
            pickle.dump(gene2go, fh)
        genes_pkl = os.path.join(td, "pert_genes.pkl")
        with open(genes_pkl, "wb") as fh:
            pickle.dump(sorted(gene2go), fh)
        pd_ = PertData(data_path, gene_set_path=genes_pkl)
        pd_.new_data_process(dataset_name="epiflow", adata=a)
        split_pkl = os.path.join(td, "split.pkl")
        with open(split_pkl, "wb") as fh:
            pickle.dump({"train": ["ctrl", *fit_c], "val": val_c, "test": val_c}, fh)
        pd_.prepare_split(split="custom", split_dict_path=split_pkl)
        pd_.get_dataloader(batch_size=int(params.get("batch_size", 32)), test_batch_size=128)
        pert_list = list(pd_.pert_names)
        graph = build_gene_graph(go, genes=pert_list, threshold=0.1, top_k=int(params.get("k_go", 20)))
        go_edges = pd.DataFrame({"source": [pert_list[i] for i in graph.edge_index[0]],
                                 "target": [pert_list[i] for i in graph.edge_index[1]],
                                 "importance": graph.edge_weight.astype(np.float64)})
        go_edges = pd.concat([go_edges, pd.DataFrame({"source": pert_list, "target": pert_list, "importance": 1.0})],
                             ignore_index=True)
        g_go = GeneSimNetwork(go_edges, pert_list, node_map=pd_.node_map_pert)
        ctrl_x = x[np.isin(cond, ["ctrl", *[c for c in fit_c if "ctrl" in c]])].toarray()
        co = coexpression_edges(ctrl_x, threshold=float(params.get("coexpress_threshold", 0.4)),
                                k=int(params.get("k_coexpress", 20)))
        co = pd.DataFrame({"source": [feat[i] for i in co["source"]], "target": [feat[i] for i in co["target"]],
                           "importance": co["importance"].to_numpy()})
        g_co = GeneSimNetwork(co, feat, node_map={f: i for i, f in enumerate(feat)})
        model = GEARS(pd_, device=params.get("device", "cpu"))
        model.model_initialize(hidden_size=int(params.get("hidden_size", 64)), G_go=g_go.edge_index,
                               G_go_weight=g_go.edge_weight, G_coexpress=g_co.edge_index,
                               G_coexpress_weight=g_co.edge_weight)
        model.train(epochs=epochs, lr=float(params.get("lr", 1e-3)))
        queries = [[g for g in _gears_condition(h, control).split("+") if g != "ctrl"] for h in held]
        res = model.predict(queries)
    pred = np.stack([np.asarray(res["_".join(q)], np.float32).ravel() for q in queries])
    return BaselineOutput(predicted=pred, groups=np.asarray(held), features=np.arange(adata.n_vars),
                          info={"epochs": epochs, "n_train_conditions": len(fit_c), "n_val_conditions": len(val_c),
                                "go_graph_nodes": len(pert_list), "go_graph_edges": int(len(go_edges)),
                                "coexpression_edges": int(len(co))})
