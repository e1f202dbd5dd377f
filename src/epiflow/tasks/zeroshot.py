"""Zero-shot cell-type annotators (EpiAgent-B / EpiAgent-NT style; SPEC §5).

:func:`train_annotator` fine-tunes a pretrained EpiAgent with the authors' supervised classifier head
(``classifier.fc1 [256, D] -> layer_norm1 -> dropout -> fc2 [128, 256] -> GELU -> layer_norm2 ->
fc3 [C, 128]``, focal loss) on a labelled atlas whose labels are first coarsened with a label map, and
saves the result in the authors' supervised checkpoint format (embedding + encoder keys, then the
classifier keys; no pretraining heads, no criterion buffers) plus ``classes.tsv`` (class index ->
label; the state dict has no names). :func:`annotate` applies such a checkpoint to new data without
any training and, where the data carry known labels (mapped through a label map), reports accuracy,
micro F1, balanced accuracy and macro F1; optionally classes predicted for fewer than
``min_class_fraction`` (0.5 %) of the cells are masked (their logits set to -inf, so those cells get
their next best class).

Shared helpers of the downstream tasks in this file: :func:`load_cells` (corpus / shard / h5ad ->
:class:`~epiflow.corpus.shard.Shard`), :func:`read_label_map` / :func:`apply_label_map`,
:func:`load_model`. Training runs on :func:`epiflow.train.engine.fit`.

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
from ..io import atomic_path
from .features import labelled_mask
from ..metrics.table import metric_rows, metrics_frame, write_metrics

log = logging.getLogger(__name__)

TASK = "zeroshot_annotation"
CLASSES_FILE = "classes.tsv"
# cCREs accessible in the annotator's training cells (vocabulary indices), for annotate(restrict_ccres=True)
REFERENCE_CCRES_FILE = "reference_ccres.npy"


# ----------------------------------------------------------------------------- cells
def load_cells(source, *, df=None, dataset: str | None = None, max_cells: int | None = None, seed: int = 0):
    """Cells as one :class:`~epiflow.corpus.shard.Shard` (rank-ordered sentences + counts + obs).

    ``source``: a Shard, a Corpus, a corpus folder, a shard ``.h5``, an ``.h5ad`` / AnnData of raw
    counts (tokenized with ``df``: an array, a ``df.npy`` path, or ``var['df']``). ``dataset`` keeps the
    cells whose ``obs['dataset']`` equals it (several datasets: a list or a comma-separated string; the
    cells stay in corpus order); ``max_cells`` draws a random subset (``seed``).
    """
    import anndata as ad

    from ..corpus.shard import Corpus, Shard, open_corpus, read_shard, shard_from_counts

    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists():
            raise InputFormatError("input does not exist", path=str(p),
                                   fix="pass a corpus folder, a shard .h5 or an .h5ad of raw counts")
        if p.is_dir():
            source = open_corpus(p)
        elif p.suffix == ".h5ad":
            source = ad.read_h5ad(p)
        else:
            source = read_shard(p)
    if isinstance(source, Corpus):
        shards = list(source.iter_shards())
        if not shards:
            raise InputFormatError("the corpus has no shards", path=str(source.root))
        source = Shard.concat(shards)
    if isinstance(source, ad.AnnData):
        if df is None:
            if "df" not in source.var:
                raise InputFormatError("no document frequencies for an h5ad input", field="df",
                                       fix="pass --df <corpus>/df.npy (the corpus the model was trained on)")
            df = source.var["df"].to_numpy()
        elif isinstance(df, (str, os.PathLike)):
            df = np.load(df)
        df = np.asarray(df, dtype=np.float64)
        if df.shape != (source.n_vars,):
            raise InputFormatError(f"df has {df.shape[0]} entries but the h5ad has {source.n_vars} cCREs",
                                   field="df", fix="use the df.npy of the corpus whose vocabulary the h5ad uses")
        X = source.layers["counts"] if "counts" in source.layers else source.X
        obs = source.obs.copy()
        if "cell_id" not in obs:
            obs["cell_id"] = source.obs_names.astype(str)
        source = shard_from_counts(X, df, obs.reset_index(drop=True))
    if not isinstance(source, Shard):
        raise InputFormatError(f"cannot read cells from a {type(source).__name__}",
                               fix="pass a corpus folder, a shard .h5 or an .h5ad")
    sh = source
    names = dataset_names(dataset)
    if names:
        if "dataset" not in sh.obs:
            raise InputFormatError("obs has no 'dataset' column to select a dataset", field="obs/dataset")
        have_col = sh.obs["dataset"].astype(str).to_numpy()
        missing = [n for n in names if not (have_col == n).any()]
        if missing:
            have = sorted(set(have_col))
            raise EpiflowError(f"no cell of dataset {', '.join(repr(m) for m in missing)} (have: {have})",
                               field="dataset")
        sh = sh.subset(np.flatnonzero(np.isin(have_col, names)))
    if max_cells is not None and sh.n_cells > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(sh.n_cells, int(max_cells), replace=False))
        sh = sh.subset(rows)
    return sh


def dataset_names(dataset) -> list[str]:
    """``dataset`` as a list of names: None -> [], "a,b" -> ["a", "b"], a sequence as is."""
    if dataset is None:
        return []
    if isinstance(dataset, str):
        return [d.strip() for d in dataset.split(",") if d.strip()]
    return [str(d) for d in dataset]


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


# ----------------------------------------------------------------------------- model / batches
def load_model(checkpoint, num_heads: int | None = None, *, n_ccres: int | None = None, device=None):
    """Load a checkpoint (authors' format) as a trainable float32 model on ``device`` (a real copy,
    not memory-mapped), attention backend ``auto`` (packed while training, padded sdpa for inference
    on CPU)."""
    from ..model import load_epiagent_checkpoint

    return load_epiagent_checkpoint(checkpoint, num_heads, n_ccres=n_ccres, mmap=False,
                                    device=device or "cpu", dtype=torch.float32, backend="auto")


def _device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------- training
def train_annotator(checkpoint, cells, *, out_dir, label_key: str = "cell_type", label_map=None,
                    num_heads: int | None = None, classifier: str = "mlp", loss: str = "focal",
                    epochs: float = 3.0, max_steps: int | None = None, batch_size: int = 16,
                    lr: float = 1e-4, head_lr: float = 1e-3, weight_decay: float = 0.01,
                    freeze_encoder: bool = False, max_len: int = 2048, val_fraction: float = 0.1,
                    min_cells_per_class: int = 2, seed: int = 0, device=None, dataset: str | None = None,
                    progress: bool = True) -> dict:
    """Fine-tune ``checkpoint`` (pretrained EpiAgent) into a zero-shot annotator; see the module docstring.

    ``cells``: anything :func:`load_cells` reads (or a Shard). ``label_map``: dict or TSV path (labels
    coarsened before training; unmapped cells are dropped). A stratified ``val_fraction`` of the cells is
    held out and scored. Writes in ``out_dir``: ``checkpoint.pth`` (+ ``checkpoint.pth.json`` with the
    config), ``classes.tsv``, ``train_log.tsv`` (step, loss), ``metrics.tsv`` (validation accuracy /
    macro F1 ...). Returns a dict with paths, classes and the metrics table.
    """
    from ..model import derive
    from ..model.checkpoint import save_epiagent_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    cells = load_cells(cells)
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
    if val_fraction > 0:
        for c in range(len(classes)):
            m = idx[y_all[idx] == c]
            nv = int(np.floor(len(m) * val_fraction))
            if nv >= 1 and len(m) - nv >= 1:
                val[rng.choice(m, nv, replace=False)] = True
    train_idx = idx[~val[idx]]
    val_idx = idx[val[idx]]

    base = load_model(checkpoint, num_heads, n_ccres=cells.n_ccres)
    # the authors' supervised layout: embeddings + encoder copied, new classifier, no pretraining heads
    model = derive(base, classes=len(classes), classifier=classifier, pretrain_heads=False, seed=seed).to(dev)
    del base
    max_len = int(min(max_len, model.config.max_rank - 2))
    enc = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    if freeze_encoder:
        for p in enc:
            p.requires_grad_(False)
    from ..train.engine import Classification, FitConfig, fit

    obj = Classification(cells, train_idx, y_all[train_idx], loss="focal" if loss == "focal" else "ce",
                         max_len=max_len)
    # max_steps replaces the epochs (not only caps them)
    cfg = FitConfig(epochs=float(epochs) if max_steps is None else int(max_steps), max_steps=max_steps, batch_size=int(batch_size), lr=float(lr),
                    head_lr=float(head_lr), weight_decay=float(weight_decay), seed=int(seed), device=str(dev),
                    progress=progress, desc="train annotator")
    try:
        hist = fit(model, obj, cfg)
    finally:
        if freeze_encoder:
            for p in enc:
                p.requires_grad_(True)
    total = len(hist)
    log_rows = hist[["step", "loss"]].to_dict("records")

    ckpt = save_epiagent_checkpoint(model.cpu(), out / "checkpoint.pth", write_config=True)
    with atomic_path(out / CLASSES_FILE) as tmp:
        pd.DataFrame({"index": range(len(classes)), "label": classes}).to_csv(tmp, sep="\t", index=False)
    seen = np.flatnonzero(covered_ccres(cells.subset(train_idx))).astype(np.int64)
    with atomic_path(out / REFERENCE_CCRES_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, seen)
    with atomic_path(out / "train_log.tsv") as tmp:
        pd.DataFrame(log_rows).to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    ds = dataset or _dataset_name(cells)
    rows = metric_rows(TASK, ds, "train", {"n_cells_train": len(train_idx), "n_cells_val": len(val_idx),
                                           "n_cells_unlabelled": n_drop, "n_classes": len(classes),
                                           "steps": total, "final_loss": log_rows[-1]["loss"],
                                           "n_ccres_seen": len(seen)})
    if len(val_idx):
        pred, _ = predict(model, cells.subset(val_idx), device=dev, max_len=max_len, progress=False)
        vals = classification_scores(np.asarray(classes, dtype=object)[y_all[val_idx]],
                                     np.asarray(classes, dtype=object)[pred])
        rows += metric_rows(TASK, ds, "validation", vals)
    table = metrics_frame(rows)
    write_metrics(table, out / "metrics.tsv")
    log.info("annotator with %d classes saved to %s", len(classes), ckpt)
    return {"checkpoint": ckpt, "classes": classes, "metrics": table, "model": model}


def _dataset_name(cells) -> str:
    if "dataset" in cells.obs:
        ds = cells.obs["dataset"].astype(str).unique()
        if len(ds) == 1:
            return str(ds[0])
    return "all"


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

    logits = engine_predict(model, cells, "logits", max_len=max_len, batch_tokens=batch_tokens,
                            device=_device(device), progress=progress, desc="annotate")
    return logits.argmax(1), logits


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


def annotate(checkpoint, cells, *, classes=None, num_heads: int | None = None, label_key: str | None = None,
             label_map=None, min_class_fraction: float | None = 0.005, out_dir=None, dataset: str | None = None,
             method: str = "EpiAgent-zeroshot", device=None, max_len: int = 8190, restrict_ccres=None,
             progress: bool = True) -> dict:
    """Annotate ``cells`` with a supervised checkpoint, no training.

    ``classes``: list or ``classes.tsv`` path (default: ``classes.tsv`` beside the checkpoint).
    With ``label_key`` the known labels (mapped through ``label_map``; cells without a mapped label are
    excluded) score the predictions; with ``min_class_fraction`` the masked predictions are scored too
    (method ``<method>-masked``). Writes ``predictions.tsv`` (cell, prediction, masked prediction,
    probability, known label) and ``metrics.tsv`` to ``out_dir`` when given. Returns a dict with
    ``predictions`` (DataFrame) and ``metrics`` (long table).

    ``restrict_ccres``: drop the tokens of cCREs that the annotator never saw accessible in training
    (``True``: ``reference_ccres.npy`` beside the checkpoint, written by :func:`train_annotator`; or a
    path to such a file, a boolean mask or cCRE indices). Needed when the reference was measured on a
    smaller peak panel than the new data (e.g. the 5,000-peak Granja 2019 subset against Buenrostro
    2018): otherwise most tokens of a new cell are cCREs the classifier never learnt from.
    """
    from ..model import EpiAgent

    model = checkpoint if isinstance(checkpoint, EpiAgent) else None
    if model is None:
        from ..model import load_epiagent_checkpoint

        model = load_epiagent_checkpoint(checkpoint, num_heads)
        if classes is None:
            classes = Path(checkpoint).with_name(CLASSES_FILE)
    if getattr(model, "classifier", None) is None:
        raise ConfigError(f"the checkpoint is a {model.kind} model without a classifier",
                          fix="pass a supervised checkpoint (epiflow train-annotator)")
    if classes is None:
        raise EpiflowError("no class names: pass classes=", field="classes")
    if isinstance(classes, (str, os.PathLike)):
        classes = read_classes(classes)
    classes = [str(c) for c in classes]
    if len(classes) != model.config.num_classes:
        raise ConfigError(f"the classifier has {model.config.num_classes} classes but {len(classes)} names "
                          "were given", field="classes", fix="pass the classes.tsv written with this checkpoint")
    cells = load_cells(cells)
    if cells.n_ccres != model.n_ccres:
        from ..errors import VocabularyMismatchError

        raise VocabularyMismatchError(f"the data have {cells.n_ccres} cCREs but the model {model.n_ccres}",
                                      fix="map the data onto the checkpoint's cCRE vocabulary")
    extra: dict[str, float] = {}
    if restrict_ccres is not None and restrict_ccres is not False:
        keep = restrict_ccres
        if keep is True:
            if not isinstance(checkpoint, (str, os.PathLike)):
                raise EpiflowError("restrict_ccres=True needs the checkpoint path (reference_ccres.npy beside it)",
                                   field="restrict_ccres", fix="pass the cCRE list or mask itself")
            keep = Path(checkpoint).with_name(REFERENCE_CCRES_FILE)
        if isinstance(keep, (str, os.PathLike)):
            if not Path(keep).exists():
                raise InputFormatError("the annotator's cCRE list is missing", path=str(keep),
                                       fix="train the annotator with this epiflow version (it writes "
                                           f"{REFERENCE_CCRES_FILE}) or do not restrict the cCREs")
            keep = np.load(keep)
        before = float(np.median(cells.lengths)) if cells.n_cells else 0.0
        cells = restrict_to_ccres(cells, keep)
        extra = {"median_ccres_per_cell": before,
                 "median_ccres_per_cell_kept": float(np.median(cells.lengths)) if cells.n_cells else 0.0}
    pred, logits = predict(model, cells, device=device, max_len=max_len, progress=progress)
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
    ds = dataset or _dataset_name(cells)
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
    table = metrics_frame(rows)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "predictions.tsv") as tmp:
            res.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
        if label_key is not None and "label_mapped" in res:
            _confusion_figure(res, out / "confusion.png", classes)
        write_metrics(table, out / "metrics.tsv")
    return {"predictions": res, "metrics": table, "masked_classes": [classes[i] for i in masked_ids]}


def _confusion_figure(res: pd.DataFrame, path: Path, classes) -> None:
    from ..plots import save_figure
    from ..plots.embedding import _figure

    ok = res["label_mapped"].notna()
    if not ok.any():
        return
    tab = pd.crosstab(res.loc[ok, "label_mapped"].astype(str), res.loc[ok, "prediction"].astype(str))
    frac = tab.div(tab.sum(1), axis=0)
    fig = _figure(1.2 + 0.6 * frac.shape[1], 1.0 + 0.5 * frac.shape[0])
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(frac.to_numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(frac.shape[1]), frac.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(frac.shape[0]), frac.index, fontsize=8)
    for (i, j), v in np.ndenumerate(tab.to_numpy()):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("known (mapped)")
    ax.set_title("zero-shot annotation (row-normalised)", fontsize=9)
    save_figure(fig, path)
