"""Figure of zero-shot annotation (``epiflow annotate-zeroshot``): the confusion matrix of the known
(mapped) labels against the predictions, drawn from :func:`epiflow.tasks.zeroshot.run_annotate`'s
predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .embedding import _figure, save_figure


def confusion_figure(res: pd.DataFrame, path) -> list[Path]:
    """Row-normalised confusion (``label_mapped`` x ``prediction``, counts written in the cells) at
    ``path``; nothing when no cell has a mapped label."""
    ok = res["label_mapped"].notna()
    if not ok.any():
        return []
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
    return save_figure(fig, path)
