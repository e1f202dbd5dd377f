"""Imputation (SPEC §5): fine-tune EpiAgent with CCA (K = 1) + signal reconstruction as an MSE
regression of the TF-IDF values, read the imputed matrix from the signal decoder, and evaluate it as
the paper does, beside the raw data and an LSI-reconstruction baseline.

:func:`run` (on cells and a model loaded by :func:`epiflow.tasks.common.load_cells` /
:func:`epiflow.tasks.common.load_model`):

1. fine-tunes all parameters on all cells of the input (labels are not used for training):
   ``loss = cca_weight * CCA + sr_weight * SR_mse`` where CCA is the pretraining cell-cCRE alignment
   (BCE; every accessible cCRE of the cell as a positive and as many random inaccessible cCREs as
   negatives, K = 1) and ``SR_mse`` the mean over all ``cells x cCREs`` of the squared difference
   between the signal decoder's output and the cell's global TF-IDF vector (zeros where closed; the
   same TF-IDF that tokenization uses, SPEC §2);
2. imputes every cell: decoder output on the top ``max_len`` tokens (eval mode), negative values
   clipped to 0 (TF-IDF is non-negative);
3. evaluates on the cCREs open in ``>= min_cell_fraction`` (3 %) of the cells, for three matrices of
   the same (TF-IDF) scale: ``Raw`` (the observed TF-IDF), ``LSI-recon`` (rank-``lsi_components``
   truncated-SVD reconstruction of the observed TF-IDF, clipped at 0) and ``EpiAgent`` (imputed):

   * PCA + Leiden with the resolution bisected to the number of cell types: NMI, ARI;
   * Pearson r and MSE against the per-cell-type mean of the observed TF-IDF, per cell and per cCRE
     (median and mean over cells / cCREs; constant rows or columns have no r and are counted in
     ``n_nan_pearson_*``) — :mod:`epiflow.metrics.imputation`.

It returns a :class:`~epiflow.tasks.common.TaskResult`; ``epiflow impute``
(:mod:`epiflow.tasks.imputation_cli`) writes it with :func:`epiflow.report.results.write_task_result`:
``metrics.tsv`` (long table, task ``imputation``), ``imputed.h5ad`` (cells x kept cCREs, ``X`` =
imputed float32, ``layers['raw_tfidf']`` sparse observed TF-IDF, ``var`` chrom/start/end/ccre_index,
``obs`` of the shards), ``per_cell.tsv`` / ``per_ccre.tsv`` (the per-cell / per-cCRE values of every
method), ``train_log.tsv`` and, with ``save_model``, ``finetuned.pth`` (+ side file); the figure
``imputation_box.png`` comes from :func:`epiflow.plots.imputation.imputation_figures`.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, EpiflowError
from ..metrics.imputation import N_NEIGHBORS, evaluate_imputation
from ..metrics.table import dataset_label, metric_rows, metrics_frame
from .annotation import (WEIGHT_DECAY, cell_ids, check_model_vocab, check_trainer,
                         effective_max_len, obs_labels, shared_finetune)
from .common import TaskResult, resolve_device
from .config import ImputationConfig
from .features import labelled_mask

log = logging.getLogger(__name__)

TASK = "imputation"
METHODS = ("Raw", "LSI-recon", "EpiAgent")


# ============================================================================ losses
def _need_heads(model) -> None:
    for attr, what in (("signal_decoder", "signal decoder"), ("fc1_for_CCA", "CCA head")):
        if getattr(model, attr, None) is None:
            raise ConfigError(f"the {model.kind} checkpoint has no {what}; imputation fine-tunes CCA + SR",
                              field="checkpoint", fix="use a pretrained (base) checkpoint with the pretraining heads")


def finetune_imputation(model, shard, *, epochs: float = 5, lr: float = 5e-4, head_lr: float | None = None,
                        batch_size: int = 16,
                        max_len: int | None = None, weight_decay: float = 0.01, cca_weight: float = 1.0,
                        sr_weight: float = 1.0, cca_max_pos: int | None = None, max_steps: int | None = None,
                        seed: int = 0, device=None, grad_clip: float = 1.0, progress: bool = True) -> pd.DataFrame:
    """Fine-tune ``model`` in place with CCA (BCE, K = 1) + MSE signal reconstruction of the TF-IDF
    values on all cells of ``shard``, with the engine (:func:`epiflow.train.engine.fit`; the signal
    decoder and CCA head at ``head_lr``, default 10 x ``lr``).
    Returns the per-step log (step, epoch, loss, cca, sr_mse, lr)."""
    from ..train.engine import FitConfig, Reconstruction, fit

    _need_heads(model)
    obj = Reconstruction(shard, sr="mse", k=1, cca_max_pos=cca_max_pos, max_len=effective_max_len(model, max_len),
                         weights={"cca": float(cca_weight), "sr": float(sr_weight)})
    cfg = FitConfig(epochs=float(epochs), max_steps=max_steps, batch_size=int(batch_size), lr=float(lr),
                    head_lr=float(head_lr if head_lr is not None else 10 * lr), weight_decay=weight_decay,
                    clip_grad=grad_clip, seed=int(seed), device=str(resolve_device(device)), progress=progress,
                    desc="fine-tune imputation")
    hist = fit(model, obj, cfg).rename(columns={"sr": "sr_mse"})
    return hist[["step", "epoch", "loss", "cca", "sr_mse", "lr"]]


def decode_signal(model, shard, columns=None, *, max_len: int | None = None, batch_size: int = 64, device=None,
                  clip: bool = True) -> np.ndarray:
    """Signal-decoder output [n_cells, len(columns)] (float32) of every cell (top ``max_len`` tokens;
    :func:`epiflow.train.engine.predict`), negatives clipped to 0 with ``clip``."""
    from ..train.engine import predict

    out = predict(model, shard, "signal", columns=columns, max_len=max_len, max_cells=int(batch_size),
                  device=resolve_device(device))
    if clip:
        np.maximum(out, 0.0, out=out)
    return out


def lsi_reconstruction(x, n_components: int = 50, seed: int = 0, clip: bool = True) -> np.ndarray:
    """Rank-k truncated-SVD reconstruction ``U S V^T`` of a (TF-IDF) matrix, negatives clipped to 0."""
    from sklearn.decomposition import TruncatedSVD

    k = int(min(n_components, min(x.shape) - 1))
    if k < 1:
        raise EpiflowError(f"LSI reconstruction needs at least 2 cells and 2 cCREs, got {x.shape}", field="matrix")
    svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=7, random_state=seed)
    u = svd.fit_transform(x)
    rec = (u @ svd.components_).astype(np.float32)
    if clip:
        np.maximum(rec, 0.0, out=rec)
    return rec


# ============================================================================ evaluation
def evaluate_against_raw(raw, imputed, labelled, labels, *, lsi_components: int = 50, n_pcs: int = 50,
                         n_neighbors: int = 15, seed: int = 0):
    """:func:`evaluate_imputation` of the task's three methods on the labelled cells: the raw TF-IDF
    ``raw`` (cells x kept cCREs, sparse), its LSI reconstruction and ``imputed``, against the per-type
    mean of the raw TF-IDF. ``labelled``: boolean mask of the cells with a label; ``labels``: theirs.
    One float32 dense copy of the raw matrix serves as both the Raw method and the reference, and no
    matrix is copied to select the labelled cells when every cell has a label."""
    def pick(a):
        return a if labelled.all() else a[labelled]

    raw_lab = pick(np.asarray(raw.toarray(), dtype=np.float32))
    mats = {"Raw": raw_lab, "LSI-recon": pick(lsi_reconstruction(raw, lsi_components, seed)),
            "EpiAgent": pick(imputed)}
    return evaluate_imputation(mats, labels, raw_lab, n_pcs=n_pcs, n_neighbors=n_neighbors, seed=seed)


# ============================================================================ the task
def run(cells, model, settings: ImputationConfig | None = None, *, vocab: pd.DataFrame | None = None,
        dataset: str | None = None) -> TaskResult:
    """Fine-tune for imputation, impute, evaluate (see the module docstring).

    ``cells``: a :class:`~epiflow.corpus.shard.Shard` (:func:`epiflow.tasks.common.load_cells`);
    ``model``: a trainable pretrained (base) :class:`~epiflow.model.EpiAgent` with its pretraining heads
    (:func:`epiflow.tasks.common.load_model`, which copies), fine-tuned IN PLACE; ``vocab``: the
    corpus' cCREs (``vocab.bed``, :func:`epiflow.tasks.common.corpus_vocab`) for the var names of the
    imputed matrix (None: ``ccre<j>``); ``dataset``: the name of the metric rows (default: the cells'
    one ``obs['dataset']``, else ``all``).

    Returns a :class:`~epiflow.tasks.common.TaskResult`: ``metrics`` (task ``imputation``, methods Raw
    / LSI-recon / EpiAgent; metrics on the labelled cells), ``tables`` ``per_cell`` / ``per_ccre``,
    ``history`` (the per-step log), ``h5ad`` ``imputed`` (all cells x the kept cCREs, ``X`` float32
    imputed TF-IDF), ``models`` ``finetuned``, ``data`` ``agreement`` (method -> per-cell / per-cCRE
    arrays), ``scores`` (method -> values), ``dataset``, ``n_ccres_kept``.

    ``trainer``: two settings of the one engine (:func:`epiflow.train.engine.fit`), both CCA as BCE
    with K = 1 and SR as MSE of the TF-IDF: ``"task"`` (fixed-size cell batches, constant learning
    rate, decoder / CCA head at ``head_lr``, ``max_steps``) or ``"shared"``
    (:func:`epiflow.train.finetune` with objective ``"mse"``: token-budget batches, cosine schedule,
    one learning rate; no ``max_steps``).
    """
    import anndata as ad

    from ..cliargs import check_config
    from ..metrics.imputation import open_fraction_filter

    cfg = settings if settings is not None else ImputationConfig()
    check_config(cfg)
    check_trainer(cfg.trainer, cfg.max_steps)
    check_model_vocab(model, cells)
    t_start = time.perf_counter()
    shard = cells
    seed, max_len, label_key = int(cfg.seed), cfg.max_len, cfg.label_key
    ds_name = dataset_label(shard, dataset)
    labels_all = obs_labels(shard, label_key)
    lab = labelled_mask(labels_all)
    y = np.asarray(labels_all[lab]).astype(str)
    if len(np.unique(y)) < 2:
        raise EpiflowError(f"need at least 2 labelled cell types in obs['{label_key}'] for the evaluation",
                           field=f"obs/{label_key}")
    counts = shard.counts_csr()
    keep = np.flatnonzero(open_fraction_filter(counts, cfg.min_cell_fraction))
    if len(keep) < 3:
        raise EpiflowError(f"only {len(keep)} cCREs are open in >= {cfg.min_cell_fraction:.0%} of the cells",
                           field="min_cell_fraction", fix="lower --min-cell-fraction")
    log.info("imputation on %s: %d cells (%d labelled, %d types), %d of %d cCREs open in >= %.1f%% of cells",
             ds_name, shard.n_cells, int(lab.sum()), len(np.unique(y)), len(keep), shard.n_ccres,
             100 * cfg.min_cell_fraction)
    device = resolve_device(cfg.device)
    model.to(device)
    _need_heads(model)

    t0 = time.perf_counter()
    if cfg.trainer == "shared":
        train_log = shared_finetune(model, shard, ("mse",), epochs=cfg.epochs, lr=cfg.lr, max_len=max_len,
                                    weight_decay=WEIGHT_DECAY, seed=seed, device=device, progress=cfg.progress)
    else:
        train_log = finetune_imputation(model, shard, epochs=cfg.epochs, lr=cfg.lr, head_lr=cfg.head_lr,
                                        batch_size=cfg.batch_size, max_len=max_len, weight_decay=WEIGHT_DECAY,
                                        cca_weight=cfg.w_cca, sr_weight=cfg.w_sr,
                                        cca_max_pos=cfg.cca_max_pos, max_steps=cfg.max_steps, seed=seed,
                                        device=device, progress=cfg.progress)
    train_s = time.perf_counter() - t0
    imputed = decode_signal(model, shard, keep, max_len=max_len, device=device)

    raw = shard.tfidf_csr()[:, keep]
    scores, agreement = evaluate_against_raw(raw, imputed, lab, y, lsi_components=cfg.lsi_components,
                                             n_pcs=cfg.n_pcs, n_neighbors=N_NEIGHBORS, seed=seed)
    rows = []
    for method in METHODS:
        vals = dict(scores[method])
        vals.update({"n_cells": int(lab.sum()), "n_ccres_kept": len(keep), "n_ccres_total": shard.n_ccres})
        if method == "EpiAgent":
            vals.update({"train_steps": int(train_log["step"].iloc[-1]) if len(train_log) else 0,
                         "train_seconds": train_s,
                         "train_loss_first": float(train_log["loss"].iloc[0]) if len(train_log) else math.nan,
                         "train_loss_last": float(train_log["loss"].tail(max(1, len(train_log) // 10)).mean())
                         if len(train_log) else math.nan})
        if method == "LSI-recon":
            vals["lsi_components"] = int(min(cfg.lsi_components, min(raw.shape) - 1))
        rows += metric_rows(TASK, ds_name, method, vals)
    metrics = metrics_frame(rows)

    ids = cell_ids(shard)
    obs = shard.obs.copy()
    obs.index = ids
    obs = obs.astype({c: str for c in obs.columns if obs[c].dtype == object})
    var = pd.DataFrame({"ccre_index": keep.astype(np.int64)})
    if vocab is not None and len(vocab) == shard.n_ccres:
        v = vocab.iloc[keep].reset_index(drop=True)
        cols = list(v.columns[:3])
        var["chrom"] = v[cols[0]].astype(str).to_numpy()
        var["start"] = v[cols[1]].astype(np.int64).to_numpy()
        var["end"] = v[cols[2]].astype(np.int64).to_numpy()
        var.index = [f"{c}:{s}-{e}" for c, s, e in zip(var["chrom"], var["start"], var["end"])]
    else:
        var.index = [f"ccre{j}" for j in keep]
    if not var.index.is_unique:
        var.index = [f"ccre{j}" for j in keep]
    adata = ad.AnnData(X=imputed, obs=obs, var=var)
    adata.layers["raw_tfidf"] = sp.csr_matrix(raw, dtype=np.float32)
    epochs = float(cfg.epochs)
    adata.uns["epiflow_imputation"] = {"dataset": ds_name, "min_cell_fraction": float(cfg.min_cell_fraction),
                                       "epochs": int(epochs) if epochs.is_integer() else epochs,
                                       "lr": float(cfg.lr), "seed": seed, "trainer": cfg.trainer}

    pc = pd.DataFrame({"cell_id": ids[lab], label_key: y})
    pcc = pd.DataFrame({"ccre_index": keep})
    for m in METHODS:
        pc[f"pearson_{m}"] = agreement[m]["pearson_cell"]
        pc[f"mse_{m}"] = agreement[m]["mse_cell"]
        pcc[f"pearson_{m}"] = agreement[m]["pearson_ccre"]
        pcc[f"mse_{m}"] = agreement[m]["mse_ccre"]
    log.info("imputation done in %.1f s", time.perf_counter() - t_start)
    return TaskResult(metrics=metrics, tables={"per_cell": pc, "per_ccre": pcc}, history=train_log,
                      models={"finetuned": model}, h5ad={"imputed": adata},
                      data={"agreement": {m: agreement[m] for m in METHODS}, "scores": scores,
                            "dataset": ds_name, "n_ccres_kept": len(keep)})
