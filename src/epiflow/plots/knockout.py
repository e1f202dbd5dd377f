"""Figures of ``epiflow knockout``: the UMAP of the chimeric reference cells coloured by score with one
arrow per target (query cells with the cCRE added -> removed), and the bar chart of the mean effects
beside the random control."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .embedding import _figure, save_figure


def knockout_figures(result, out: str | os.PathLike, *, title: str = "", seed: int = 0,
                     svg: bool = False) -> list[Path]:
    """``knockout_umap.png`` and ``knockout_effects.png`` in ``out`` from the
    :class:`~epiflow.tasks.common.TaskResult` of :func:`epiflow.tasks.knockout.run` (table
    ``knockout``; ``data`` ``reference_embedding``, ``reference_scores``, ``query_knn``, ``n_targets``,
    ``random_effects``). Returns the paths written."""
    import anndata as ad
    import scanpy as sc

    from ..metrics import knn_graph
    from ..tasks.knockout import target_name

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = result.data
    ref_emb = res["reference_embedding"]
    a = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(ref_emb))]))
    a.obsm["X_e"] = np.asarray(ref_emb, dtype=np.float32)
    knn_graph(a, use_rep="X_e", n_neighbors=15, seed=seed)
    sc.tl.umap(a, random_state=seed)
    xy = a.obsm["X_umap"]
    tab = result.tables["knockout"]
    nt = res["n_targets"]
    fig = _figure(6.4, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    pts = ax.scatter(xy[:, 0], xy[:, 1], c=res["reference_scores"], cmap="coolwarm", s=6, linewidths=0,
                     rasterized=True)
    fig.colorbar(pts, ax=ax, label="cancerization score")
    knn = res["query_knn"]
    for i in range(nt):
        start = xy[knn[i, 0]].mean(1).mean(0)  # added
        end = xy[knn[i, 1]].mean(1).mean(0)    # removed
        ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", lw=1.5, color="black"))
        lab = target_name(tab.iloc[i])
        ax.text(start[0], start[1], lab, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    ax.set_title(title or "in-silico knockout: query cells, cCRE added -> removed", fontsize=9)
    written = save_figure(fig, out / "knockout_umap.png", svg=svg)

    fig = _figure(1.5 + 0.45 * (nt + 1), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    names = [target_name(r) for _, r in tab.iterrows()] + ["random"]
    means = list(tab["mean_effect"]) + [float(np.mean(res["random_effects"]))]
    sds = list(tab["sd_effect"]) + [float(np.std(res["random_effects"]))]
    cols = ["#c0392b" if p < 0.05 else "#7f8c8d" for p in tab["p_value"]] + ["#bdc3c7"]
    ax.bar(range(len(means)), means, yerr=sds, color=cols, capsize=2)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(means)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("change of mean score (removed - added)")
    ax.set_title("knockout effects (red: p < 0.05 vs random)", fontsize=9)
    written += save_figure(fig, out / "knockout_effects.png", svg=svg)
    return written
