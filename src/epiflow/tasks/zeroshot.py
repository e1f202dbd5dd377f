"""Zero-shot cell-type annotators (EpiAgent-B / EpiAgent-NT style; SPEC §5).

:func:`run_train` (``epiflow train-annotator``) fine-tunes a pretrained EpiAgent with the authors' supervised classifier head
(``classifier.fc1 [256, D] -> layer_norm1 -> dropout -> fc2 [128, 256] -> GELU -> layer_norm2 ->
fc3 [C, 128]``, focal loss) on a labelled atlas whose labels are first coarsened with a label map, and
saves the result in the authors' supervised checkpoint format (embedding + encoder keys, then the
classifier keys; no pretraining heads, no criterion buffers) plus ``classes.tsv`` (class index ->
label; the state dict has no names), written by the CLI (:mod:`epiflow.tasks.zeroshot_cli`).
:func:`run_annotate` (``epiflow annotate-zeroshot``) applies such a checkpoint to new data without
any training and, where the data carry known labels (mapped through a label map), reports accuracy,
micro F1, balanced accuracy and macro F1; optionally classes predicted for fewer than
``min_class_fraction`` (0.5 %) of the cells are masked (their logits set to -inf, so those cells get
their next best class). It also writes the annotator's cell embeddings (the CLS readout its classifier
reads) as a UMAP in ``cells.tsv`` beside the labels and predictions (panels fig6b / fig6e).

Both compute and return a :class:`~epiflow.tasks.common.TaskResult`; the cells and the model come from
:func:`epiflow.tasks.common.load_cells` / :func:`~epiflow.tasks.common.load_model`. Helpers shared with
other tasks in this file: :func:`read_label_map` / :func:`apply_label_map`, :func:`obs_column`,
:func:`covered_ccres` / :func:`restrict_to_ccres`, :func:`classification_scores`. Training runs on
:func:`epiflow.train.engine.fit`.

Label-map file (``resources/label_maps/*.tsv``): tab-separated, header ``source<TAB>target``, ``#``
comments; a source label missing from the map, or mapped to an empty target, becomes unlabelled
(excluded from training and from the metrics).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import ConfigError, EpiflowError, InputFormatError
from ..metrics.table import dataset_label, metric_rows, metrics_frame
from .config import AnnotatorConfig, ZeroshotConfig
from .features import labelled_mask

log = logging.getLogger(__name__)

TASK = "zeroshot_annotation"
CLASSES_FILE = "classes.tsv"
# cCREs accessible in the annotator's training cells (vocabulary indices), read by annotate-zeroshot --restrict-ccres
REFERENCE_CCRES_FILE = "reference_ccres.npy"


# ----------------------------------------------------------------------------- cells
def covered_ccres(cells) -> np.ndarray:
    """Boolean mask over the vocabulary: the cCREs accessible in at least one of ``cells``."""
    from ..tokenize import NUM_SPECIAL

    mask = np.zeros(cells.n_ccres, dtype=bool)
    mask[np.asarray(cells.tokens, dtype=np.int64) - NUM_SPECIAL] = True
    return mask


def restrict_to_ccres(cells, keep):
    """The cells with every token outside ``keep`` (boolean mask over the vocabulary, or cCRE indices)
    dropped; the rank order of the kept tokens is unchanged (a cell's TF-IDF ranks do not depend on the
    other cCREs). Used where datasets were measured on different peak panels, so that a model only sees
    the cCREs that the other side can have (zero-shot annotation, integration, query mapping)."""
    from ..corpus.shard import Shard
    from ..tokenize import NUM_SPECIAL

    keep = np.asarray(keep)
    if keep.dtype != bool:
        mask = np.zeros(cells.n_ccres, dtype=bool)
        mask[keep.astype(np.int64)] = True
        keep = mask
    if keep.shape != (cells.n_ccres,):
        raise EpiflowError(f"the cCRE mask has {keep.shape[0]} entries but the data have {cells.n_ccres} cCREs",
                           field="ccres", fix="use the cCRE list written with this model / corpus")
    tk = keep[np.asarray(cells.tokens, dtype=np.int64) - NUM_SPECIAL]
    row = np.repeat(np.arange(cells.n_cells), cells.lengths)
    lens = np.bincount(row[tk], minlength=cells.n_cells)
    empty = int((lens == 0).sum())
    if empty:
        log.warning("%d of %d cells have no accessible cCRE among the %d kept", empty, cells.n_cells,
                    int(keep.sum()))
    return Shard(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), cells.tokens[tk], cells.counts[tk],
                 cells.tfidf[tk], cells.obs, cells.n_ccres, cells.vocab_id, cells.genome, dict(cells.attrs))


def obs_column(cells, key: str, what: str = "label") -> np.ndarray:
    if key not in cells.obs:
        raise InputFormatError(f"obs has no column '{key}' (have: {list(cells.obs.columns)})",
                               field=f"obs/{key}", fix=f"pass the {what} column with --{what}-key")
    return cells.obs[key].to_numpy(dtype=object)


# ----------------------------------------------------------------------------- label maps
def read_label_map(path) -> dict[str, str]:
    """``{source label: target label}`` from a label-map TSV (header ``source<TAB>target``)."""
    path = Path(path)
    if not path.exists():
        raise InputFormatError("label map not found", path=str(path),
                               fix="pass a TSV with columns source, target (see resources/label_maps/)")
    out: dict[str, str] = {}
    header_seen = False
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if not header_seen:
            if [p.strip().lower() for p in parts[:2]] != ["source", "target"]:
                raise InputFormatError("the first line must be the header 'source<TAB>target'", path=str(path),
                                       line=lineno, fix="start the file with: source\\ttarget")
            header_seen = True
            continue
        if len(parts) < 1 or len(parts) > 2 or not parts[0].strip():
            raise InputFormatError(f"expected 'source<TAB>target', got {line!r}", path=str(path), line=lineno)
        src = parts[0].strip()
        tgt = parts[1].strip() if len(parts) == 2 else ""
        if src in out and out[src] != tgt:
            raise InputFormatError(f"label '{src}' is mapped twice ('{out[src]}' and '{tgt}')", path=str(path),
                                   line=lineno, fix="keep one line per source label")
        out[src] = tgt
    if not header_seen:
        raise InputFormatError("empty label map", path=str(path))
    return out


def apply_label_map(labels, label_map: dict[str, str] | None) -> np.ndarray:
    """Map labels; unmapped / empty targets and missing labels become ``None``."""
    lab = np.asarray(labels, dtype=object)
    ok = labelled_mask(lab)
    out = np.full(lab.shape, None, dtype=object)
    if label_map is None:
        out[ok] = lab[ok].astype(str)
        return out
    s = pd.Series(lab[ok].astype(str)).map(label_map)
    vals = s.to_numpy(dtype=object)
    vals = np.array([v if isinstance(v, str) and v else None for v in vals], dtype=object)
    out[ok] = vals
    return out


# ----------------------------------------------------------------------------- training
def run_train(base, cells, cfg: AnnotatorConfig | None = None, *, label_map=None, dataset: str | None = None,
              min_cells_per_class: int = 2, weight_decay: float = 0.01):
    """Fine-tune ``base`` (a pretrained EpiAgent, :func:`epiflow.tasks.common.load_model`; only its
    embedding and encoder weights are read) into a zero-shot annotator on ``cells`` (a Shard,
    :func:`epiflow.tasks.common.load_cells`); see the module docstring. Nothing is written.

    ``cfg``: :class:`~epiflow.tasks.config.AnnotatorConfig` (``max_cells`` is the loader's, not used
    here). ``label_map``: dict or TSV path (labels coarsened before training; unmapped cells are
    dropped). A stratified ``cfg.val_fraction`` of the cells is held out and scored. ``dataset``: the
    dataset name of the metric rows (default: the cells' one ``obs['dataset']``, else ``all``).

    Returns a :class:`~epiflow.tasks.common.TaskResult`: ``metrics`` (train rows and held-out
    validation accuracy / macro F1 ...), ``history`` (step, loss: ``train_log.tsv``), ``models``
    ``{"checkpoint": the supervised model}`` (``checkpoint.pth`` in the authors' supervised format),
    ``tables['classes']`` (index, label: ``classes.tsv``), ``data``: ``classes`` (the names in class
    order) and ``reference_ccres`` (vocabulary indices of the cCREs accessible in the training cells:
    ``reference_ccres.npy``, see :func:`write_annotator`).
    """
    from ..cliargs import check_config
    from ..model import derive
    from ..train.engine import resolve_device
    from .common import TaskResult

    cfg = AnnotatorConfig() if cfg is None else cfg
    check_config(cfg)
    label_key, classifier, seed = cfg.label_key, cfg.classifier, cfg.seed
    dev = resolve_device(cfg.device)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if isinstance(label_map, (str, os.PathLike)):
        label_map = read_label_map(label_map)
    labels = apply_label_map(obs_column(cells, label_key), label_map)
    keep = np.array([v is not None for v in labels])
    counts = pd.Series(labels[keep]).value_counts()
    small = counts[counts < min_cells_per_class].index
    if len(small):
        log.warning("dropping classes with fewer than %d cells: %s", min_cells_per_class, list(small))
        keep &= ~pd.Series(labels).isin(small).to_numpy()
    n_drop = int((~keep).sum())
    if n_drop:
        log.info("%d of %d cells have no (mapped) label and are not used", n_drop, cells.n_cells)
    classes = sorted(set(labels[keep]))
    if len(classes) < 2:
        raise EpiflowError(f"need at least 2 classes to train an annotator, found {classes}",
                           field=f"obs/{label_key}", fix="check --label-key and the label map")
    idx = np.flatnonzero(keep)
    y_all = np.full(cells.n_cells, -1, dtype=np.int64)
    y_all[idx] = pd.Index(classes).get_indexer(labels[idx])
    # stratified hold-out
    val = np.zeros(cells.n_cells, bool)
    if cfg.val_fraction > 0:
        for c in range(len(classes)):
            m = idx[y_all[idx] == c]
            nv = int(np.floor(len(m) * cfg.val_fraction))
            if nv >= 1 and len(m) - nv >= 1:
                val[rng.choice(m, nv, replace=False)] = True
    train_idx = idx[~val[idx]]
    val_idx = idx[val[idx]]

    from .annotation import check_model_vocab

    check_model_vocab(base, cells)
    # the authors' supervised layout: embeddings + encoder copied, new classifier, no pretraining heads
    model = derive(base, classes=len(classes), classifier=classifier, pretrain_heads=False, seed=seed).to(dev)
    max_len = model.config.max_rank - 2 if cfg.max_len is None else int(min(cfg.max_len, model.config.max_rank - 2))
    enc = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    if cfg.freeze_encoder:
        for p in enc:
            p.requires_grad_(False)
    from ..train.engine import Classification, FitConfig, fit

    obj = Classification(cells, train_idx, y_all[train_idx], loss="focal" if cfg.loss == "focal" else "ce",
                         max_len=max_len)
    max_steps = cfg.max_steps
    # max_steps replaces the epochs (not only caps them)
    fit_cfg = FitConfig(epochs=float(cfg.epochs) if max_steps is None else int(max_steps), max_steps=max_steps,
                        batch_size=int(cfg.batch_size), lr=float(cfg.lr), head_lr=float(cfg.head_lr),
                        weight_decay=float(weight_decay), seed=int(seed), device=str(dev), progress=cfg.progress,
                        desc="train annotator")
    try:
        hist = fit(model, obj, fit_cfg)
    finally:
        if cfg.freeze_encoder:
            for p in enc:
                p.requires_grad_(True)
    total = len(hist)
    log_tab = hist[["step", "loss"]].reset_index(drop=True)
    seen = np.flatnonzero(covered_ccres(cells.subset(train_idx))).astype(np.int64)
    ds = dataset_label(cells, dataset)
    rows = metric_rows(TASK, ds, "train", {"n_cells_train": len(train_idx), "n_cells_val": len(val_idx),
                                           "n_cells_unlabelled": n_drop, "n_classes": len(classes),
                                           "steps": total, "final_loss": float(log_tab["loss"].iloc[-1]),
                                           "n_ccres_seen": len(seen)})
    if len(val_idx):
        pred, _ = predict(model, cells.subset(val_idx), device=dev, max_len=max_len, progress=False)
        vals = classification_scores(np.asarray(classes, dtype=object)[y_all[val_idx]],
                                     np.asarray(classes, dtype=object)[pred])
        rows += metric_rows(TASK, ds, "validation", vals)
    log.info("annotator with %d classes trained", len(classes))
    return TaskResult(metrics=metrics_frame(rows), history=log_tab, models={"checkpoint": model},
                      tables={"classes": pd.DataFrame({"index": range(len(classes)), "label": classes})},
                      data={"classes": classes, "reference_ccres": seen})


# ----------------------------------------------------------------------------- inference
def read_classes(path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise InputFormatError("class list not found", path=str(path),
                               fix="pass --classes <train-annotator out dir>/classes.tsv")
    t = pd.read_csv(path, sep="\t", dtype={"label": str})
    if list(t.columns[:2]) != ["index", "label"]:
        raise InputFormatError("expected columns 'index', 'label'", path=str(path), line=1)
    if not (t["index"].to_numpy() == np.arange(len(t))).all():
        raise InputFormatError("column 'index' must be 0, 1, 2, ... in order", path=str(path), field="index")
    return t["label"].astype(str).tolist()


def predict(model, cells, *, device=None, max_len: int = 8190, batch_tokens: int = 65_536,
            progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Class index and logits ``[n_cells, C]`` of every cell (inference mode, top-``max_len`` tokens;
    :func:`epiflow.train.engine.predict`)."""
    from ..train.engine import predict as engine_predict
    from ..train.engine import resolve_device

    logits = engine_predict(model, cells, "logits", max_len=max_len, batch_tokens=batch_tokens,
                            device=resolve_device(device), progress=progress, desc="annotate")
    return logits.argmax(1), logits


def predict_and_embed(model, cells, *, device=None, max_len: int = 8190, batch_tokens: int = 65_536,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class index, logits ``[n_cells, C]`` and the cell embedding ``[n_cells, D]`` the classifier reads
    (the CLS readout of the annotator's encoder) of every cell, from one inference pass
    (:func:`epiflow.train.engine.predict`)."""
    from ..train.engine import predict as engine_predict
    from ..train.engine import resolve_device

    out = engine_predict(model, cells, ("logits", "embedding"), max_len=max_len, batch_tokens=batch_tokens,
                         device=resolve_device(device), progress=progress, desc="annotate")
    logits = out["logits"]
    return logits.argmax(1), logits, out["embedding"]


def mask_rare_classes(logits: np.ndarray, min_fraction: float = 0.005) -> tuple[np.ndarray, list[int]]:
    """Predictions after masking classes predicted for fewer than ``min_fraction`` of the cells (their
    logits -> -inf, so those cells take their next best class). Returns ``(prediction, masked class ids)``."""
    pred = logits.argmax(1)
    frac = np.bincount(pred, minlength=logits.shape[1]) / max(len(pred), 1)
    masked = [int(c) for c in np.flatnonzero(frac < min_fraction)]
    if not masked or len(masked) == logits.shape[1]:
        return pred, []
    lg = logits.copy()
    lg[:, masked] = -np.inf
    return lg.argmax(1), masked


def classification_scores(true, pred) -> dict[str, float]:
    """Accuracy, micro F1, balanced accuracy and macro F1 (scikit-learn; labels = union of both sides)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    t = np.asarray(true).astype(str)
    p = np.asarray(pred).astype(str)
    labels = sorted(set(t) | set(p))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"accuracy": float(accuracy_score(t, p)),
                "micro_F1": float(f1_score(t, p, labels=labels, average="micro", zero_division=0)),
                "balanced_accuracy": float(balanced_accuracy_score(t, p)),
                "macro_F1": float(f1_score(t, p, labels=labels, average="macro", zero_division=0)),
                "n_cells": float(len(t))}


def read_reference_ccres(path) -> np.ndarray:
    """The annotator's cCRE list (``reference_ccres.npy`` written by ``epiflow train-annotator``)."""
    path = Path(path)
    if not path.exists():
        raise InputFormatError("the annotator's cCRE list is missing", path=str(path),
                               fix="train the annotator with this epiflow version (it writes "
                                   f"{REFERENCE_CCRES_FILE}) or do not restrict the cCREs")
    return np.load(path)


def run_annotate(model, cells, classes, cfg: ZeroshotConfig | None = None, *, label_map=None,
                 dataset: str | None = None, restrict_ccres=None):
    """Annotate ``cells`` (a Shard) with a supervised ``model`` (an EpiAgent with a classifier:
    ``epiflow train-annotator``'s ``checkpoint.pth``, or the authors' EpiAgent-B / -NT), no training.
    Nothing is written.

    ``classes``: the class names in classifier order (:func:`read_classes` of ``classes.tsv``).
    ``cfg``: :class:`~epiflow.tasks.config.ZeroshotConfig`. With ``cfg.label_key`` the known labels
    (mapped through ``label_map``, a dict or TSV path; cells without a mapped label are excluded) score
    the predictions; with ``cfg.mask`` (and ``cfg.min_class_fraction`` > 0) the masked predictions are
    scored too (method ``<method>-masked``).

    ``restrict_ccres``: drop the tokens of cCREs that the annotator never saw accessible in training (a
    boolean mask over the vocabulary or cCRE indices: :func:`read_reference_ccres` of the
    ``reference_ccres.npy`` written beside the checkpoint). Needed when the reference was measured on a
    smaller peak panel than the new data (e.g. the 5,000-peak Granja 2019 subset against Buenrostro
    2018): otherwise most tokens of a new cell are cCREs the classifier never learnt from.

    Returns a :class:`~epiflow.tasks.common.TaskResult`: ``metrics``; ``data``: ``predictions`` (cell,
    prediction, probability, masked prediction, known label and mapped label: ``predictions.tsv``),
    ``cells`` (cell, label, label_mapped, prediction and with ``cfg.umap`` the UMAP ``umap1`` / ``umap2``
    of the annotator's cell embeddings: ``cells.tsv``), ``embeddings`` (``[n_cells, D]``, the CLS
    embeddings the classifier reads), ``classes``, ``masked_classes`` (the names of the masked classes).
    """
    from ..cliargs import check_config
    from .common import TaskResult

    cfg = ZeroshotConfig() if cfg is None else cfg
    check_config(cfg)
    label_key, method = cfg.label_key, cfg.method
    min_class_fraction = cfg.min_class_fraction if cfg.mask else None
    if getattr(model, "classifier", None) is None:
        raise ConfigError(f"the checkpoint is a {model.kind} model without a classifier",
                          fix="pass a supervised checkpoint (epiflow train-annotator)")
    classes = [str(c) for c in classes]
    if len(classes) != model.config.num_classes:
        raise ConfigError(f"the classifier has {model.config.num_classes} classes but {len(classes)} names "
                          "were given", field="classes", fix="pass the classes.tsv written with this checkpoint")
    from .annotation import check_model_vocab

    check_model_vocab(model, cells)
    extra: dict[str, float] = {}
    if restrict_ccres is not None:
        before = float(np.median(cells.lengths)) if cells.n_cells else 0.0
        cells = restrict_to_ccres(cells, restrict_ccres)
        extra = {"median_ccres_per_cell": before,
                 "median_ccres_per_cell_kept": float(np.median(cells.lengths)) if cells.n_cells else 0.0}
    pred, logits, emb = predict_and_embed(model, cells, device=cfg.device, max_len=cfg.max_len,
                                          progress=cfg.progress)
    z = logits - logits.max(1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    cls = np.asarray(classes, dtype=object)
    ids = (cells.obs["cell_id"].astype(str).to_numpy() if "cell_id" in cells.obs
           else np.arange(cells.n_cells).astype(str))
    res = pd.DataFrame({"cell": ids, "prediction": cls[pred], "probability": prob[np.arange(len(pred)), pred]})
    masked_ids: list[int] = []
    if min_class_fraction:
        mpred, masked_ids = mask_rare_classes(logits, min_class_fraction)
        res["prediction_masked"] = cls[mpred]
    ds = dataset_label(cells, dataset)
    rows = metric_rows(TASK, ds, method, {"n_cells_total": cells.n_cells,
                                          "n_classes_masked": len(masked_ids), **extra})
    if label_key is not None:
        if isinstance(label_map, (str, os.PathLike)):
            label_map = read_label_map(label_map)
        raw = obs_column(cells, label_key)
        known = apply_label_map(raw, label_map)
        res["label"] = raw
        res["label_mapped"] = known
        ok = np.array([v is not None for v in known])
        outside = ok & ~np.isin(known.astype(str), classes)
        if outside.any():
            log.warning("%d evaluated cells have labels the classifier does not know (%s): counted as errors",
                        int(outside.sum()), sorted(set(known[outside])))
        rows += metric_rows(TASK, ds, method, {"n_cells_unlabelled": int((~ok).sum()),
                                               "n_cells_unknown_class": int(outside.sum())})
        if ok.any():
            rows += metric_rows(TASK, ds, method, classification_scores(known[ok], res["prediction"][ok]))
            if "prediction_masked" in res:
                rows += metric_rows(TASK, ds, f"{method}-masked",
                                    classification_scores(known[ok], res["prediction_masked"][ok]))
    return TaskResult(metrics=metrics_frame(rows),
                      data={"predictions": res, "cells": _cells_table(res, emb, cfg), "embeddings": emb,
                            "classes": classes, "masked_classes": [classes[i] for i in masked_ids]})


def _cells_table(res: pd.DataFrame, emb: np.ndarray, cfg: ZeroshotConfig) -> pd.DataFrame:
    """``cells.tsv``: cell, known label and mapped label (with a label key), prediction and, with
    ``cfg.umap``, the UMAP (``umap1`` / ``umap2``) of the annotator's cell embeddings (panels fig6b / fig6e)."""
    from .common import umap_coords

    tab = res[[c for c in ("cell", "label", "label_mapped", "prediction") if c in res.columns]].copy()
    if cfg.umap and len(tab) >= 3:
        xy = umap_coords(emb, seed=cfg.seed)
        tab["umap1"], tab["umap2"] = xy[:, 0], xy[:, 1]
    elif cfg.umap:
        log.warning("no UMAP of %d cells (needs at least 3)", len(tab))
    return tab
