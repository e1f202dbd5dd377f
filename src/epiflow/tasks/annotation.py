"""Supervised cell-type annotation (SPEC §5): a classifier on the EpiAgent cell embedding, fine-tuned
end to end, beside LSI baselines.

:func:`annotate` does, on the labelled cells of a corpus (or of one of its data sets):

1. a seeded stratified split, per cell type ``query_fraction`` (1/3) of the cells to the *query*, the
   rest to the *reference* (a type with a single cell stays in the reference);
2. fine-tuning on the reference: the pretrained encoder plus a new classifier on the [CLS] embedding,
   ``head="linear"`` (the paper: one linear layer, cross-entropy) or ``head="mlp_focal"`` (the authors'
   code: 512-256-128-C MLP, focal loss, gamma 2), all parameters trained with AdamW (the head at
   ``head_lr``), sentences subsampled rank-preservingly to ``max_len`` tokens in training and cut to
   the top ``max_len`` at prediction (SPEC §2);
3. predictions for every cell (query, reference, and unlabelled cells) and, beside them, three
   baselines trained on the same reference cells: ``LSI+LogReg`` and ``LSI+SVM`` (logistic regression /
   linear SVM on LSI fitted on the reference counts, query cells projected with the reference IDF and
   SVD), and ``EpiAgent-frozen+LogReg`` (logistic regression on the zero-shot embeddings of the
   pretrained model: what fine-tuning adds);
4. scores on the query cells: accuracy, macro F1, micro F1, weighted F1, balanced accuracy
   (:mod:`epiflow.metrics.classification`).

Outputs in ``out_dir`` (each written atomically): ``metrics.tsv`` (the long table of
:mod:`epiflow.tasks.features`, task ``annotation``), ``predictions.tsv`` (``cell_id``, ``dataset``,
``split``, ``true``, one ``pred_<method>`` column per method, ``prob_EpiAgent``), ``confusion.tsv``
(EpiAgent, query cells, counts), ``train_log.tsv`` (loss per step), ``confusion.png`` (row-normalised
confusion of EpiAgent and the best LSI baseline), ``sankey.png`` (true -> predicted flows of the
query cells) and, with ``save_model``, ``finetuned.pth`` (+ ``.json`` side file and ``classes.json``).

The helpers :func:`load_cells` and :func:`load_model`
are shared with :mod:`epiflow.tasks.imputation`; training runs on :func:`epiflow.train.engine.fit`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..errors import ConfigError, EpiflowError, InputFormatError
from ..io import atomic_path
from ..train.engine import max_input_len as effective_max_len
from .features import labelled_mask
from ..metrics.table import metric_rows, metrics_frame, write_metrics, write_tsv

log = logging.getLogger(__name__)

TASK = "annotation"
HEADS = ("linear", "mlp_focal")


# ============================================================================ shared helpers
def load_cells(data, *, dataset: str | None = None):
    """All cells of ``data`` as one :class:`~epiflow.corpus.shard.Shard`.

    ``data``: a corpus folder (or :class:`~epiflow.corpus.shard.Corpus`), a shard ``.h5`` path, a list
    of shard paths, or a Shard. ``dataset`` keeps the cells whose ``obs['dataset']`` equals it.
    Returns ``(shard, vocab)`` where ``vocab`` is the corpus ``vocab.bed`` as a DataFrame (or None).
    """
    from ..corpus.shard import Corpus, Shard, open_corpus, read_shard

    vocab = None
    if isinstance(data, Shard):
        shard = data
    elif isinstance(data, (list, tuple)):
        shard = Shard.concat(read_shard(p) for p in data)
    else:
        if isinstance(data, (str, os.PathLike)) and not Path(data).is_dir():
            p = Path(data)
            if not p.exists():
                raise InputFormatError("corpus folder or shard does not exist", path=str(p),
                                       fix="pass the corpus folder written by epiflow build-corpus")
            shard = read_shard(p)
        else:
            corpus = data if isinstance(data, Corpus) else open_corpus(data)
            shard = Shard.concat(corpus.iter_shards())
            try:
                vocab = corpus.vocab()
            except Exception:  # noqa: BLE001 - the vocabulary is only used for var names
                vocab = None
    if dataset is not None:
        if "dataset" not in shard.obs:
            raise InputFormatError("the shards have no obs/dataset column to select a dataset",
                                   field="obs/dataset")
        rows = np.flatnonzero(shard.obs["dataset"].astype(str).to_numpy() == str(dataset))
        if rows.size == 0:
            have = sorted(shard.obs["dataset"].astype(str).unique())
            raise EpiflowError(f"no cell of dataset '{dataset}' (have: {have})", field="dataset",
                               fix="pass one of the corpus' data sets")
        shard = shard.subset(rows)
    if shard.n_cells == 0:
        raise InputFormatError("no cells in the input", field="cells")
    return shard, vocab


def load_model(checkpoint, *, n_ccres: int | None = None, num_heads: int | None = None, backend: str = "sdpa",
               device=None, dropout: float | None = None):
    """A trainable copy of a checkpoint (path, or an :class:`~epiflow.model.EpiAgent` that is deep-copied)."""
    from ..errors import VocabularyMismatchError
    from ..model import EpiAgent, load_epiagent_checkpoint

    if isinstance(checkpoint, EpiAgent):
        model = copy.deepcopy(checkpoint)
        if n_ccres is not None and model.n_ccres != int(n_ccres):
            raise VocabularyMismatchError(f"the model has {model.n_ccres} cCREs but the data has {n_ccres}",
                                          field="n_ccres", fix="use a model trained on this cCRE vocabulary")
    else:
        p = Path(checkpoint)
        if not p.exists():
            raise InputFormatError("checkpoint does not exist", path=str(p),
                                   fix="pass checkpoint.pth written by epiflow pretrain (or the authors' file)")
        kw = {} if dropout is None else {"dropout": float(dropout)}
        model = load_epiagent_checkpoint(p, num_heads=num_heads, n_ccres=n_ccres, mmap=False, **kw)
    if device is not None:
        model.to(torch.device(device))
    model.set_backend(backend)
    return model


def resolve_device(device=None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_train_args(epochs, lr, batch_size, max_steps):
    if int(epochs) < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}", field="epochs")
    if not float(lr) > 0:
        raise ConfigError(f"lr must be > 0, got {lr}", field="lr")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    if max_steps is not None and int(max_steps) < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}", field="max_steps")


def dataset_name(shard, dataset: str | None) -> str:
    if dataset is not None:
        return str(dataset)
    ds = shard.obs["dataset"].astype(str).unique() if "dataset" in shard.obs else []
    return str(ds[0]) if len(ds) == 1 else "all"


def cell_ids(shard) -> np.ndarray:
    obs = shard.obs
    ids = obs["cell_id"].astype(str).to_numpy() if "cell_id" in obs else np.array([f"cell{i}" for i in
                                                                                   range(len(obs))])
    if not pd.Index(ids).is_unique:
        ids = np.array([f"{c}-{i}" for i, c in enumerate(ids)])
    return ids


TRAINERS = ("task", "shared")


def shared_finetune(model, shard, objectives, *, cells=None, labels=None, epochs: int, lr: float,
                    max_len: int | None, weight_decay: float, seed: int, device, progress: bool,
                    batch_tokens: int = 4096) -> pd.DataFrame:
    """``--trainer shared``: the engine with token-budget batches and a cosine schedule
    (:func:`epiflow.train.finetune.finetune`); returns its per-step log."""
    from ..train.finetune import finetune

    res = finetune(model, shard, objectives, cells=cells, labels=labels, epochs=int(epochs), lr=float(lr),
                   max_len=effective_max_len(model, max_len), weight_decay=weight_decay, seed=int(seed),
                   device=str(device), progress=progress, batch_tokens=int(batch_tokens))
    return res["log"]


def check_trainer(trainer: str, max_steps) -> None:
    if trainer not in TRAINERS:
        raise ConfigError(f"unknown trainer {trainer!r}", field="trainer", fix=f"use one of {', '.join(TRAINERS)}")
    if trainer == "shared" and max_steps is not None:
        raise ConfigError("max_steps is not supported by the shared fine-tuning loop", field="max_steps",
                          fix="use trainer='task' or drop max_steps (use fewer epochs)")


# ============================================================================ split and baselines
def stratified_split(labels, query_fraction: float = 1 / 3, seed: int = 0) -> np.ndarray:
    """Seeded stratified split; returns a boolean array, True = query.

    Per label with ``n`` cells, ``round(n * query_fraction)`` random cells go to the query, kept within
    ``[1, n - 1]`` when ``n >= 2`` (so every type has reference and query cells); single cells stay
    in the reference."""
    if not 0.0 < float(query_fraction) < 1.0:
        raise ConfigError(f"query_fraction must be in (0, 1), got {query_fraction}", field="query_fraction")
    y = np.asarray(labels).astype(str)
    rng = np.random.default_rng([int(seed), 2 ** 16 + 3])
    is_query = np.zeros(len(y), dtype=bool)
    names, inv = np.unique(y, return_inverse=True)
    keys = rng.random(len(y))
    order = np.lexsort((keys, inv))  # random order within each label
    counts = np.bincount(inv, minlength=len(names))
    nq = np.rint(counts * float(query_fraction)).astype(np.int64)
    nq = np.where(counts >= 2, np.clip(nq, 1, counts - 1), 0)
    rank = np.arange(len(y)) - np.repeat(np.cumsum(counts) - counts, counts)
    is_query[order] = rank < np.repeat(nq, counts)
    return is_query


def _lsi_tfidf(x: sp.csr_matrix, idf: np.ndarray) -> sp.csr_matrix:
    x = sp.csr_matrix(x, dtype=np.float32, copy=True)
    x.eliminate_zeros()
    x.data[:] = 1.0
    depth = np.maximum(np.diff(x.indptr), 1)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    x.data = np.log1p(x.data / depth[rows] * idf[x.indices] * 1e4).astype(np.float32)
    return x


def lsi_reference_projection(ref_counts, other_counts, n_components: int = 50, drop_first="auto", seed: int = 0):
    """LSI fitted on the reference cells (binarised TF-IDF with the reference IDF, truncated SVD), other
    cells projected onto it; the same recipe as :func:`epiflow.baselines.lsi`. Returns
    ``(ref_embedding, other_embedding, info)``."""
    from scipy.stats import spearmanr
    from sklearn.decomposition import TruncatedSVD

    ref = sp.csr_matrix(ref_counts)
    oth = sp.csr_matrix(other_counts)
    bref = ref.copy()
    bref.eliminate_zeros()
    df = np.bincount(bref.indices, minlength=ref.shape[1]).astype(np.float64)
    idf = np.log1p(ref.shape[0] / (1.0 + df))
    xr, xo = _lsi_tfidf(ref, idf), _lsi_tfidf(oth, idf)
    k = int(min(n_components, min(ref.shape) - 1))
    if k < 2:
        raise EpiflowError(f"LSI needs at least 3 reference cells and features, got {ref.shape}", field="counts")
    svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=7, random_state=seed)
    er = svd.fit_transform(xr)
    eo = svd.transform(xo) if xo.shape[0] else np.zeros((0, k))
    depth = np.diff(xr.indptr)
    rho = 0.0 if np.ptp(depth) == 0 or np.ptp(er[:, 0]) == 0 else float(spearmanr(er[:, 0], depth).statistic)
    drop = bool(abs(rho) > 0.9) if drop_first == "auto" else bool(drop_first)
    if drop:
        er, eo = er[:, 1:], eo[:, 1:]
    return er.astype(np.float32), eo.astype(np.float32), {"depth_spearman": rho, "dropped_first": drop,
                                                          "n_components": int(er.shape[1])}


def fit_predict_linear(x_ref, y_ref, x_all, kind: str = "logreg", seed: int = 0) -> np.ndarray:
    """Standardise on the reference, fit a logistic regression (``logreg``) or linear SVM (``svm``),
    predict all cells."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    from sklearn.linear_model import LogisticRegression

    y_ref = np.asarray(y_ref).astype(str)
    if len(np.unique(y_ref)) < 2:
        return np.full(x_all.shape[0], y_ref[0] if len(y_ref) else "", dtype=object)
    clf = (LogisticRegression(max_iter=2000, random_state=seed) if kind == "logreg"
           else LinearSVC(C=1.0, max_iter=5000, random_state=seed))
    pipe = make_pipeline(StandardScaler(), clf)
    pipe.fit(np.asarray(x_ref, dtype=np.float64), y_ref)
    return pipe.predict(np.asarray(x_all, dtype=np.float64)).astype(object)


# ============================================================================ fine-tuning
def classifier_kind(head: str) -> str:
    """The model's classifier for a ``head`` of this task: ``linear`` -> ``"linear"``, ``mlp_focal`` ->
    ``"mlp"`` (:func:`epiflow.model.derive`; the classifier's parameters are ``classifier.*``)."""
    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}", field="head", fix=f"use one of {', '.join(HEADS)}")
    return "linear" if head == "linear" else "mlp"


def finetune_classifier(model, shard, rows, y, *, head: str = "linear", epochs: int = 5, lr: float = 5e-4,
                        head_lr: float | None = None, batch_size: int = 32, max_len: int | None = None,
                        weight_decay: float = 0.01, focal_gamma: float = 2.0, max_steps: int | None = None,
                        seed: int = 0, device=None, grad_clip: float = 1.0, progress: bool = True):
    """Train encoder + classifier on the cells ``rows`` of ``shard`` with integer labels ``y``
    (in place) with the engine (:func:`epiflow.train.engine.fit`; the head at ``head_lr``, default
    10 x ``lr``). Returns the per-step log (DataFrame: step, epoch, loss, accuracy, lr)."""
    from ..train.engine import Classification, FitConfig, fit

    check_train_args(epochs, lr, batch_size, max_steps)
    obj = Classification(shard, rows, y, loss="ce" if head == "linear" else "focal", focal_gamma=focal_gamma,
                         max_len=effective_max_len(model, max_len))
    cfg = FitConfig(epochs=int(epochs), max_steps=max_steps, batch_size=int(batch_size), lr=float(lr),
                    head_lr=float(head_lr if head_lr is not None else 10 * lr), weight_decay=weight_decay,
                    clip_grad=grad_clip, seed=int(seed), device=str(resolve_device(device)), progress=progress,
                    desc="fine-tune classifier")
    hist = fit(model, obj, cfg)
    return hist[["step", "epoch", "loss", "accuracy", "lr"]]


def predict_proba(model, shard, rows=None, *, max_len: int | None = None, batch_size: int = 64,
                  device=None) -> tuple[np.ndarray, np.ndarray]:
    """``(class probabilities [n, C], cell embeddings [n, D])`` of the given cells (top ``max_len``
    tokens, eval mode; :func:`epiflow.train.engine.predict`)."""
    from ..train.engine import predict

    out = predict(model, shard, ("classify", "embedding"), rows=rows, max_len=max_len, max_cells=int(batch_size),
                  device=resolve_device(device))
    return out["classify"], out["embedding"]


def zero_shot_embeddings(model, shard, *, max_len: int | None = None, device=None) -> np.ndarray:
    from ..model.inference import embed_sentences

    return embed_sentences(model, shard.indptr, shard.tokens, device=resolve_device(device),
                           max_len=effective_max_len(model, max_len), progress=False, desc="zero-shot embed")


# ============================================================================ figures
def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def confusion_figure(tables: dict, path, *, title: str = "", svg: bool = False):
    """Row-normalised confusion heatmaps, one panel per method (``{method: confusion DataFrame}``)."""
    from ..plots import save_figure

    n = len(tables)
    k = max(len(t) for t in tables.values())
    side = max(3.2, 0.42 * k + 1.6)
    fig = _figure(side * n + 0.8, side)
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for ax, (method, tab) in zip(axes, tables.items()):
        m = tab.to_numpy(dtype=float)
        s = m.sum(axis=1, keepdims=True)
        frac = np.divide(m, s, out=np.zeros_like(m), where=s > 0)
        im = ax.imshow(frac, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(tab.shape[1]), tab.columns, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(tab.shape[0]), tab.index, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(method, fontsize=10)
        if k <= 15:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    if m[i, j]:
                        ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                                color="white" if frac[i, j] > 0.5 else "black")
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="fraction of true type")
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path, svg=svg)


def sankey_figure(y_true, y_pred, path, *, title: str = "", svg: bool = False, gap: float = 0.02):
    """True -> predicted flows drawn as smooth (cubic Bezier) bands between two stacked columns."""
    from matplotlib.patches import Rectangle

    from ..plots import category_palette, save_figure

    t = np.asarray(y_true).astype(str)
    p = np.asarray(y_pred).astype(str)
    left = sorted(set(t))
    right = sorted(set(p))
    pal = category_palette(sorted(set(left) | set(right)))
    n = max(len(t), 1)
    flows = pd.crosstab(pd.Series(t, name="t"), pd.Series(p, name="p")).reindex(index=left, columns=right,
                                                                               fill_value=0)
    scale = (1.0 - gap * (max(len(left), len(right)) - 1)) / n

    def stack(names, sizes):
        pos, y = {}, 1.0
        for nm, sz in zip(names, sizes):
            pos[nm] = (y - sz * scale, y)
            y -= sz * scale + gap
        return pos

    lpos = stack(left, flows.sum(axis=1).to_numpy())
    rpos = stack(right, flows.sum(axis=0).to_numpy())
    fig = _figure(7.0, max(4.0, 0.35 * max(len(left), len(right)) + 2))
    ax = fig.add_subplot(1, 1, 1)
    x0, x1, w = 0.0, 1.0, 0.04
    s = np.linspace(0, 1, 60)
    bez = 3 * s ** 2 - 2 * s ** 3  # cubic Bezier with horizontal tangents at both ends
    xs = x0 + w + (x1 - x0 - 2 * w) * s
    lcur = {k: v[1] for k, v in lpos.items()}
    rcur = {k: v[1] for k, v in rpos.items()}
    for a in left:          # bands in a fixed order: left top to bottom, right top to bottom
        for b in right:
            v = int(flows.loc[a, b])
            if v == 0:
                continue
            h = v * scale
            ly, ry = lcur[a], rcur[b]
            top = ly + (ry - ly) * bez
            ax.fill_between(xs, top - h, top, color=pal[a], alpha=0.55 if a == b else 0.35, lw=0)
            lcur[a] -= h
            rcur[b] -= h
    for names, pos, x, ha, dx in ((left, lpos, x0, "right", -0.01), (right, rpos, x1 - w, "left", w + 0.01)):
        for nm in names:
            lo, hi = pos[nm]
            ax.add_patch(Rectangle((x, lo), w, hi - lo, color=pal[nm], lw=0))
            ax.text(x + dx, (lo + hi) / 2, nm, ha=ha, va="center", fontsize=8)
    ax.text(x0 + w / 2, 1.03, "true", ha="center", fontsize=9, weight="bold")
    ax.text(x1 - w / 2, 1.03, "predicted", ha="center", fontsize=9, weight="bold")
    ax.set_xlim(-0.3, 1.3)
    ax.set_ylim(min(min(v[0] for v in lpos.values()), min(v[0] for v in rpos.values())) - 0.02, 1.07)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path, svg=svg)


# ============================================================================ the task
def obs_labels(shard, label_key: str) -> np.ndarray:
    """The ``label_key`` column of the cells' obs (object array); a clear error when it is missing."""
    if label_key not in shard.obs:
        raise EpiflowError(f"label column '{label_key}' not in the shards' obs (have: {list(shard.obs.columns)})",
                           field=f"obs/{label_key}", fix="pass --label-key with the cell-type column")
    return shard.obs[label_key].to_numpy(dtype=object)


def annotate(data, checkpoint, label_key: str = "cell_type", *, head: str = "linear", epochs: int = 20,
             lr: float = 5e-4, head_lr: float | None = None, batch_size: int = 32, max_len: int | None = None,
             seed: int = 0, out_dir: str | os.PathLike | None = None, dataset: str | None = None,
             query_fraction: float = 1 / 3, max_steps: int | None = None, num_heads: int | None = None,
             device=None, backend: str = "sdpa", weight_decay: float = 0.01, focal_gamma: float = 2.0,
             lsi_components: int = 50, baselines: bool = True, save_model: bool = False, figures: bool = True,
             svg: bool = False, progress: bool = True, trainer: str = "task"):
    """Fine-tune a classifier on the reference cells and annotate the query (see the module docstring).

    ``data``: corpus folder / shard path(s) / Shard; ``checkpoint``: a checkpoint path (``epiflow
    pretrain``'s ``checkpoint.pth`` with its ``.json`` side file, or the authors' file with
    ``num_heads``) or an :class:`~epiflow.model.EpiAgent` (copied, not modified).

    Returns ``(predictions, metrics)``: ``predictions`` one row per cell (``cell_id``, ``dataset``,
    ``split`` = reference / query / unlabelled, ``true``, ``pred_<method>``, ``prob_EpiAgent``);
    ``metrics`` the long table (task ``annotation``; metrics on the query cells).

    Defaults (20 epochs, ``lr`` 5e-4, head at 10 x ``lr``, 32 cells per step) were chosen on the
    embedded demo with the tiny model: with a few hundred reference cells, 5 epochs (~50 steps) leave
    the classifier near the majority class; ~200 steps are needed.

    ``trainer``: two settings of the one engine (:func:`epiflow.train.engine.fit`): ``"task"``
    (fixed-size cell batches, constant learning rate, head at ``head_lr``, ``max_steps``) or
    ``"shared"`` (:func:`epiflow.train.finetune`: token-budget batches, cosine schedule, one learning
    rate; no ``max_steps``).
    """
    check_trainer(trainer, max_steps)
    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}", field="head", fix=f"use one of {', '.join(HEADS)}")
    check_train_args(epochs, lr, batch_size, max_steps)
    t_start = time.perf_counter()
    shard, _ = load_cells(data, dataset=dataset)
    ds_name = dataset_name(shard, dataset)
    labels_all = obs_labels(shard, label_key)
    lab_mask = labelled_mask(labels_all)
    lab_rows = np.flatnonzero(lab_mask)
    y_lab = np.asarray(labels_all[lab_mask]).astype(str)
    classes = np.unique(y_lab)
    if len(classes) < 2:
        raise EpiflowError(f"need at least 2 labelled cell types in obs['{label_key}'], found {len(classes)}",
                           field=f"obs/{label_key}")
    is_q = stratified_split(y_lab, query_fraction, seed)
    ref_rows, q_rows = lab_rows[~is_q], lab_rows[is_q]
    if len(q_rows) == 0:
        raise EpiflowError("the split left no query cell (too few labelled cells)", field=f"obs/{label_key}")
    y_ref_int = np.searchsorted(classes, y_lab[~is_q])
    log.info("annotation on %s: %d labelled cells (%d types): %d reference, %d query; %d unlabelled",
             ds_name, len(lab_rows), len(classes), len(ref_rows), len(q_rows), shard.n_cells - len(lab_rows))
    device = resolve_device(device)
    model = load_model(checkpoint, n_ccres=shard.n_ccres, num_heads=num_heads, backend=backend, device=device)

    split = np.full(shard.n_cells, "unlabelled", dtype=object)
    split[ref_rows] = "reference"
    split[q_rows] = "query"
    true = np.where(lab_mask, labels_all, "").astype(str)
    preds: dict[str, np.ndarray] = {}
    extra: dict[str, dict] = {}

    # --- baselines on the same reference cells
    if baselines:
        zs = zero_shot_embeddings(model, shard, max_len=max_len, device=device)
        preds["EpiAgent-frozen+LogReg"] = fit_predict_linear(zs[ref_rows], y_lab[~is_q], zs, "logreg", seed)
        counts = shard.counts_csr()
        er, eall, info = lsi_reference_projection(counts[ref_rows], counts, lsi_components, "auto", seed)
        preds["LSI+LogReg"] = fit_predict_linear(er, y_lab[~is_q], eall, "logreg", seed)
        preds["LSI+SVM"] = fit_predict_linear(er, y_lab[~is_q], eall, "svm", seed)
        extra["LSI+LogReg"] = {"lsi_components": info["n_components"], "lsi_dropped_first": int(info["dropped_first"])}

    # --- EpiAgent fine-tuned end to end
    from ..model import derive

    model = derive(model, classes=len(classes), classifier=classifier_kind(head), seed=seed)  # seeded new head
    t0 = time.perf_counter()
    if trainer == "shared":
        y_full = np.zeros(shard.n_cells, dtype=np.int64)
        y_full[ref_rows] = y_ref_int
        train_log = shared_finetune(model, shard, ("classify",), cells=ref_rows, labels=y_full, epochs=epochs,
                                    lr=lr, max_len=max_len, weight_decay=weight_decay, seed=seed, device=device,
                                    progress=progress)
    else:
        train_log = finetune_classifier(model, shard, ref_rows, y_ref_int, head=head, epochs=epochs, lr=lr,
                                        head_lr=head_lr, batch_size=batch_size, max_len=max_len,
                                        weight_decay=weight_decay, focal_gamma=focal_gamma, max_steps=max_steps,
                                        seed=seed, device=device, progress=progress)
    train_s = time.perf_counter() - t0
    probs, _ = predict_proba(model, shard, max_len=max_len, device=device)
    pred_idx = probs.argmax(1)
    ordered = {"EpiAgent": classes[pred_idx].astype(object), **preds}

    # --- scores on the query cells
    from ..metrics.classification import classification_scores, confusion_table

    rows = []
    yq = true[q_rows]
    for method, pr in ordered.items():
        vals = classification_scores(yq, np.asarray(pr)[q_rows].astype(str))
        vals.update({"n_reference": len(ref_rows), "n_query": len(q_rows), "n_classes": len(classes)})
        if method == "EpiAgent":
            vals.update({"train_steps": int(train_log["step"].iloc[-1]) if len(train_log) else 0, "train_seconds": train_s,
                         "train_loss_first": float(train_log["loss"].iloc[0]) if len(train_log) else math.nan,
                         "train_loss_last": float(train_log["loss"].tail(max(1, len(train_log) // 10)).mean())
                         if len(train_log) else math.nan})
        vals.update(extra.get(method, {}))
        rows += metric_rows(TASK, ds_name, method, vals)
        log.info("%s: accuracy %.3f, macro F1 %.3f on %d query cells", method, vals["accuracy"], vals["macro_F1"],
                 len(q_rows))
    metrics = metrics_frame(rows)

    pred_df = pd.DataFrame({"cell_id": cell_ids(shard),
                            "dataset": shard.obs["dataset"].astype(str).to_numpy() if "dataset" in shard.obs
                            else ds_name, "split": split, "true": true})
    for method, pr in ordered.items():
        pred_df[f"pred_{method}"] = np.asarray(pr).astype(str)
    pred_df["prob_EpiAgent"] = probs[np.arange(len(pred_idx)), pred_idx]

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_metrics(metrics, out / "metrics.tsv")
        write_tsv(pred_df, out / "predictions.tsv")
        write_tsv(train_log, out / "train_log.tsv")
        conf = confusion_table(yq, ordered["EpiAgent"][q_rows].astype(str), labels=list(classes))
        write_tsv(conf, out / "confusion.tsv", index=True)
        if figures:
            tables = {"EpiAgent": conf}
            lsi_methods = [m for m in ("LSI+LogReg", "LSI+SVM") if m in ordered]
            if lsi_methods:
                acc = metrics[(metrics.metric == "accuracy")].set_index("method")["value"]
                best = max(lsi_methods, key=lambda m: acc[m])
                tables[best] = confusion_table(yq, ordered[best][q_rows].astype(str), labels=list(classes))
            confusion_figure(tables, out / "confusion.png", title=f"{ds_name}: query cells", svg=svg)
            sankey_figure(yq, ordered["EpiAgent"][q_rows], out / "sankey.png",
                          title=f"{ds_name}: EpiAgent, true -> predicted (query)", svg=svg)
        if save_model:
            from ..model import save_epiagent_checkpoint

            save_epiagent_checkpoint(model, out / "finetuned.pth", write_config=True)
            with atomic_path(out / "classes.json") as tmp:
                Path(tmp).write_text(json.dumps({"label_key": label_key, "classes": classes.tolist()}, indent=1))
    log.info("annotation done in %.1f s", time.perf_counter() - t_start)
    return pred_df, metrics
