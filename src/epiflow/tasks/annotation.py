"""Supervised cell-type annotation (SPEC §5): a classifier on the EpiAgent cell embedding, fine-tuned
end to end, beside LSI baselines.

:func:`run` does, on the labelled cells of a :class:`~epiflow.corpus.shard.Shard` (the CLI loads them
with :func:`epiflow.tasks.common.load_cells`, and the model with :func:`epiflow.tasks.common.load_model`):

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

It returns a :class:`~epiflow.tasks.common.TaskResult`; ``epiflow annotate``
(:mod:`epiflow.tasks.annotation_cli`) writes it with :func:`epiflow.report.results.write_task_result`:
``metrics.tsv`` (the long table, task ``annotation``), ``predictions.tsv`` (``cell_id``, ``dataset``,
``split``, ``true``, one ``pred_<method>`` column per method, ``prob_EpiAgent``), ``confusion.tsv``
(EpiAgent, query cells, counts), ``train_log.tsv`` (loss per step) and, with ``save_model``,
``finetuned.pth`` (+ ``.json`` side file and ``classes.json``); the figures ``confusion.png`` and
``sankey.png`` come from :func:`epiflow.plots.annotation.annotation_figures`.

Training runs on :func:`epiflow.train.engine.fit`.
"""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, EpiflowError, VocabularyMismatchError
from ..metrics.table import dataset_label, metric_rows, metrics_frame
from ..tokenize.core import binarize
from ..train.engine import max_input_len as effective_max_len
from .common import TaskResult, resolve_device
from .config import AnnotationConfig
from .features import labelled_mask
from .split import stratified_split

log = logging.getLogger(__name__)

TASK = "annotation"
HEADS = ("linear", "mlp_focal")
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0


# ============================================================================ helpers (also used by imputation)
def cell_ids(shard) -> np.ndarray:
    obs = shard.obs
    ids = obs["cell_id"].astype(str).to_numpy() if "cell_id" in obs else np.array([f"cell{i}" for i in
                                                                                   range(len(obs))])
    if not pd.Index(ids).is_unique:
        ids = np.array([f"{c}-{i}" for i, c in enumerate(ids)])
    return ids


TRAINERS = ("task", "shared")


def shared_finetune(model, shard, objectives, *, cells=None, labels=None, epochs: float, lr: float,
                    max_len: int | None, weight_decay: float, seed: int, device, progress: bool,
                    batch_tokens: int = 4096) -> pd.DataFrame:
    """``--trainer shared``: the engine with token-budget batches and a cosine schedule
    (:func:`epiflow.train.finetune.finetune`); returns its per-step log."""
    from ..train.finetune import finetune

    res = finetune(model, shard, objectives, cells=cells, labels=labels, epochs=float(epochs), lr=float(lr),
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
def _lsi_tfidf(x: sp.csr_matrix, idf: np.ndarray) -> sp.csr_matrix:
    x = binarize(x)
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


def finetune_classifier(model, shard, rows, y, *, head: str = "linear", epochs: float = 5, lr: float = 5e-4,
                        head_lr: float | None = None, batch_size: int = 32, max_len: int | None = None,
                        weight_decay: float = 0.01, focal_gamma: float = 2.0, max_steps: int | None = None,
                        seed: int = 0, device=None, grad_clip: float = 1.0, progress: bool = True):
    """Train encoder + classifier on the cells ``rows`` of ``shard`` with integer labels ``y``
    (in place) with the engine (:func:`epiflow.train.engine.fit`; the head at ``head_lr``, default
    10 x ``lr``). Returns the per-step log (DataFrame: step, epoch, loss, accuracy, lr)."""
    from ..train.engine import Classification, FitConfig, fit

    obj = Classification(shard, rows, y, loss="ce" if head == "linear" else "focal", focal_gamma=focal_gamma,
                         max_len=effective_max_len(model, max_len))
    cfg = FitConfig(epochs=float(epochs), max_steps=max_steps, batch_size=int(batch_size), lr=float(lr),
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


def obs_labels(shard, label_key: str) -> np.ndarray:
    """The ``label_key`` column of the cells' obs (object array); a clear error when it is missing."""
    if label_key not in shard.obs:
        raise EpiflowError(f"label column '{label_key}' not in the shards' obs (have: {list(shard.obs.columns)})",
                           field=f"obs/{label_key}", fix="pass --label-key with the cell-type column")
    return shard.obs[label_key].to_numpy(dtype=object)


def check_model_vocab(model, cells) -> None:
    """The model must be on the cells' cCRE vocabulary (its size, and its ``vocab_id`` when both know it)."""
    from ..corpus.shard import check_vocab_id

    if int(model.n_ccres) != int(cells.n_ccres):
        raise VocabularyMismatchError(f"the model has {model.n_ccres} cCREs but the data has {cells.n_ccres}",
                                      field="n_ccres", fix="use a model trained on this cCRE vocabulary")
    check_vocab_id(getattr(model, "vocab_id", None), getattr(cells, "vocab_id", None))


def run(cells, model, settings: AnnotationConfig | None = None, *, dataset: str | None = None) -> TaskResult:
    """Fine-tune a classifier on the reference cells and annotate the query (see the module docstring).

    ``cells``: a :class:`~epiflow.corpus.shard.Shard` (:func:`epiflow.tasks.common.load_cells`);
    ``model``: a trainable :class:`~epiflow.model.EpiAgent` (:func:`epiflow.tasks.common.load_model`,
    which copies) that is fine-tuned IN PLACE (it gets the classifier); ``dataset``: the name of the
    metric rows (default: the cells' one ``obs['dataset']``, else ``all``).

    Returns a :class:`~epiflow.tasks.common.TaskResult`: ``metrics`` (task ``annotation``; metrics on
    the query cells), ``tables`` ``predictions`` (one row per cell: ``cell_id``, ``dataset``, ``split``
    = reference / query / unlabelled, ``true``, ``pred_<method>``, ``prob_EpiAgent``) and ``confusion``
    (EpiAgent on the query cells, counts), ``history`` (the per-step log), ``models`` ``finetuned``,
    ``texts`` ``classes.json`` (with ``save_model``), ``data`` ``classes`` and ``dataset``.

    Defaults (20 epochs, ``lr`` 5e-4, head at 10 x ``lr``, 32 cells per step) were chosen on the
    embedded demo with the tiny model: with a few hundred reference cells, 5 epochs (~50 steps) leave
    the classifier near the majority class; ~200 steps are needed.

    ``trainer``: two settings of the one engine (:func:`epiflow.train.engine.fit`): ``"task"``
    (fixed-size cell batches, constant learning rate, head at ``head_lr``, ``max_steps``) or
    ``"shared"`` (:func:`epiflow.train.finetune`: token-budget batches, cosine schedule, one learning
    rate; no ``max_steps``).
    """
    from ..cliargs import check_config
    from ..metrics.classification import classification_scores, confusion_table

    cfg = settings if settings is not None else AnnotationConfig()
    check_config(cfg)
    check_trainer(cfg.trainer, cfg.max_steps)
    check_model_vocab(model, cells)
    t_start = time.perf_counter()
    shard = cells
    seed, max_len = int(cfg.seed), cfg.max_len
    ds_name = dataset_label(shard, dataset)
    labels_all = obs_labels(shard, cfg.label_key)
    lab_mask = labelled_mask(labels_all)
    lab_rows = np.flatnonzero(lab_mask)
    y_lab = np.asarray(labels_all[lab_mask]).astype(str)
    classes = np.unique(y_lab)
    if len(classes) < 2:
        raise EpiflowError(f"need at least 2 labelled cell types in obs['{cfg.label_key}'], found {len(classes)}",
                           field=f"obs/{cfg.label_key}")
    is_q = stratified_split(y_lab, cfg.query_fraction, seed)
    ref_rows, q_rows = lab_rows[~is_q], lab_rows[is_q]
    if len(q_rows) == 0:
        raise EpiflowError("the split left no query cell (too few labelled cells)", field=f"obs/{cfg.label_key}")
    y_ref_int = np.searchsorted(classes, y_lab[~is_q])
    log.info("annotation on %s: %d labelled cells (%d types): %d reference, %d query; %d unlabelled",
             ds_name, len(lab_rows), len(classes), len(ref_rows), len(q_rows), shard.n_cells - len(lab_rows))
    device = resolve_device(cfg.device)
    model.to(device)

    split = np.full(shard.n_cells, "unlabelled", dtype=object)
    split[ref_rows] = "reference"
    split[q_rows] = "query"
    true = np.where(lab_mask, labels_all, "").astype(str)
    preds: dict[str, np.ndarray] = {}
    extra: dict[str, dict] = {}

    # --- baselines on the same reference cells
    if cfg.baselines:
        zs = zero_shot_embeddings(model, shard, max_len=max_len, device=device)
        preds["EpiAgent-frozen+LogReg"] = fit_predict_linear(zs[ref_rows], y_lab[~is_q], zs, "logreg", seed)
        counts = shard.counts_csr()
        er, eall, info = lsi_reference_projection(counts[ref_rows], counts, cfg.lsi_components, "auto", seed)
        preds["LSI+LogReg"] = fit_predict_linear(er, y_lab[~is_q], eall, "logreg", seed)
        preds["LSI+SVM"] = fit_predict_linear(er, y_lab[~is_q], eall, "svm", seed)
        extra["LSI+LogReg"] = {"lsi_components": info["n_components"], "lsi_dropped_first": int(info["dropped_first"])}

    # --- EpiAgent fine-tuned end to end
    from ..model import derive

    model = derive(model, classes=len(classes), classifier=classifier_kind(cfg.head), seed=seed)  # seeded new head
    t0 = time.perf_counter()
    if cfg.trainer == "shared":
        y_full = np.zeros(shard.n_cells, dtype=np.int64)
        y_full[ref_rows] = y_ref_int
        train_log = shared_finetune(model, shard, ("classify",), cells=ref_rows, labels=y_full, epochs=cfg.epochs,
                                    lr=cfg.lr, max_len=max_len, weight_decay=WEIGHT_DECAY, seed=seed, device=device,
                                    progress=cfg.progress)
    else:
        train_log = finetune_classifier(model, shard, ref_rows, y_ref_int, head=cfg.head, epochs=cfg.epochs,
                                        lr=cfg.lr, head_lr=cfg.head_lr, batch_size=cfg.batch_size, max_len=max_len,
                                        weight_decay=WEIGHT_DECAY, focal_gamma=cfg.focal_gamma,
                                        max_steps=cfg.max_steps, seed=seed, device=device, progress=cfg.progress)
    train_s = time.perf_counter() - t0
    probs, _ = predict_proba(model, shard, max_len=max_len, device=device)
    pred_idx = probs.argmax(1)
    ordered = {"EpiAgent": classes[pred_idx].astype(object), **preds}

    # --- scores on the query cells
    rows = []
    yq = true[q_rows]
    for method, pr in ordered.items():
        vals = classification_scores(yq, np.asarray(pr)[q_rows].astype(str))
        vals.update({"n_reference": len(ref_rows), "n_query": len(q_rows), "n_classes": len(classes)})
        if method == "EpiAgent":
            vals.update({"train_steps": int(train_log["step"].iloc[-1]) if len(train_log) else 0,
                         "train_seconds": train_s,
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
    conf = confusion_table(yq, ordered["EpiAgent"][q_rows].astype(str), labels=list(classes))

    texts = {}
    if cfg.save_model:  # the side file of finetuned.pth
        texts["classes.json"] = json.dumps({"label_key": cfg.label_key, "classes": classes.tolist()}, indent=1)
    log.info("annotation done in %.1f s", time.perf_counter() - t_start)
    return TaskResult(metrics=metrics, tables={"predictions": pred_df, "confusion": conf}, history=train_log,
                      models={"finetuned": model}, texts=texts, data={"classes": classes, "dataset": ds_name})
