"""Cell-type annotation metrics (SPEC §5, supervised annotation), built on scikit-learn.

* :func:`classification_scores` — accuracy, macro F1, micro F1, weighted F1 and balanced accuracy of
  predicted against true labels.
* :func:`confusion_table` — the confusion matrix as a labelled DataFrame (rows = true, columns =
  predicted), as counts or normalised per true label (``normalize="true"``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import EpiflowError


def _pair(y_true, y_pred):
    t = np.asarray(y_true).astype(str)
    p = np.asarray(y_pred).astype(str)
    if t.shape != p.shape or t.ndim != 1:
        raise EpiflowError(f"true labels {t.shape} and predictions {p.shape} differ in shape", field="labels")
    if t.size == 0:
        raise EpiflowError("no labelled cells to score", field="labels")
    return t, p


def classification_scores(y_true, y_pred) -> dict[str, float]:
    """``accuracy``, ``macro_F1``, ``micro_F1``, ``weighted_F1``, ``balanced_accuracy``.

    F1 scores use the union of true and predicted labels (a predicted type that never occurs counts
    with F1 = 0 in the macro mean, scikit-learn's convention with ``zero_division=0``); the balanced
    accuracy is the mean recall over the true labels.
    """
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    t, p = _pair(y_true, y_pred)
    true_labels = np.unique(t)
    return {
        "accuracy": float(accuracy_score(t, p)),
        "macro_F1": float(f1_score(t, p, average="macro", zero_division=0)),
        "micro_F1": float(f1_score(t, p, average="micro", zero_division=0)),
        "weighted_F1": float(f1_score(t, p, average="weighted", zero_division=0)),
        "balanced_accuracy": float(recall_score(t, p, labels=true_labels, average="macro", zero_division=0)),
    }


def confusion_table(y_true, y_pred, labels=None, normalize: str | None = None) -> pd.DataFrame:
    """Confusion matrix, rows = true label, columns = predicted label (both in ``labels`` order;
    default: sorted union of both). ``normalize``: ``None`` (counts), ``"true"`` (rows sum to 1; rows of
    absent true labels stay 0) or ``"pred"`` (columns sum to 1)."""
    from sklearn.metrics import confusion_matrix

    t, p = _pair(y_true, y_pred)
    if labels is None:
        labels = sorted(set(t) | set(p))
    labels = [str(x) for x in labels]
    if normalize not in (None, "true", "pred"):
        raise EpiflowError(f"normalize must be None, 'true' or 'pred', got {normalize!r}", field="normalize")
    m = confusion_matrix(t, p, labels=labels).astype(np.float64)
    if normalize == "true":
        s = m.sum(axis=1, keepdims=True)
        m = np.divide(m, s, out=np.zeros_like(m), where=s > 0)
    elif normalize == "pred":
        s = m.sum(axis=0, keepdims=True)
        m = np.divide(m, s, out=np.zeros_like(m), where=s > 0)
    out = pd.DataFrame(m, index=pd.Index(labels, name="true"), columns=pd.Index(labels, name="predicted"))
    return out.astype(np.int64) if normalize is None else out
