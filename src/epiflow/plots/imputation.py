"""Figure of imputation (``epiflow impute``): box plots of the per-cell / per-cCRE Pearson r and MSE of
each method and the NMI / ARI of PCA + Leiden (``imputation_box.png``), drawn from the
:class:`~epiflow.tasks.common.TaskResult` of :func:`epiflow.tasks.imputation.run`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .embedding import _figure, category_palette, save_figure

__all__ = ["imputation_figure", "imputation_figures"]


def imputation_figures(result, out: str | os.PathLike, *, svg: bool = False) -> list[Path]:
    """``imputation_box.png`` of an imputation result, in the folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = result.data
    return imputation_figure(d["agreement"], d["scores"], out / "imputation_box.png",
                             title=f"{d['dataset']}: imputation vs per-cell-type mean TF-IDF "
                                   f"({d['n_ccres_kept']} cCREs)", svg=svg)


def imputation_figure(agreement: dict, scores: dict, path, *, title: str = "", svg: bool = False):
    """Box plots of per-cell / per-cCRE Pearson r and MSE per method, and NMI / ARI bars."""
    methods = list(agreement)
    pal = category_palette(methods)
    fig = _figure(15.0, 3.6)
    axes = fig.subplots(1, 5)
    panels = [("pearson_cell", "Pearson r per cell"), ("mse_cell", "MSE per cell"),
              ("pearson_ccre", "Pearson r per cCRE"), ("mse_ccre", "MSE per cCRE")]
    for ax, (key, lab) in zip(axes, panels):
        data = [np.asarray(agreement[m][key])[np.isfinite(agreement[m][key])] for m in methods]
        bp = ax.boxplot(data, showfliers=False, patch_artist=True, widths=0.6)
        for patch, m in zip(bp["boxes"], methods):
            patch.set_facecolor(pal[m])
            patch.set_alpha(0.7)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=20, fontsize=8)
        ax.set_title(lab, fontsize=9)
        if key.startswith("mse"):
            ax.set_yscale("log")
    ax = axes[4]
    w = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        ax.bar(np.arange(2) + (i - (len(methods) - 1) / 2) * w, [scores[m]["NMI"], scores[m]["ARI"]], w,
               color=pal[m], label=m)
    ax.set_xticks([0, 1], ["NMI", "ARI"])
    ax.set_ylim(0, 1.25)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_title("PCA + Leiden (bisected)", fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="upper center", ncol=len(methods))
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, svg=svg)
