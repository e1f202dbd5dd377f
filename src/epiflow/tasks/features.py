"""Unsupervised feature extraction (SPEC §5): how well do cell embeddings separate cell types?

For every embedding (``obsm`` key) of an AnnData — EpiAgent zero-shot, EpiAgent fine-tuned, and the
LSI baseline beside them — :func:`run`

1. keeps the cells with a label (missing / empty / ``nan`` / ``None`` / ``NA`` labels are excluded
   from the metrics; how many is logged and reported as ``n_cells_unlabelled``);
2. builds scanpy's kNN graph (``n_neighbors``) on the embedding and runs Leiden (igraph) with the
   resolution bisected until the number of clusters equals the number of cell types
   (:func:`epiflow.metrics.leiden_bisect`; ``leiden_reached`` = 0 says it could not be reached);
3. scores the clusters against the labels: NMI and ARI (scikit-learn), plus the cell-type
   silhouette (scIB ASW, rescaled to [0, 1]);
4. computes the UMAP of each embedding (the CLI draws them coloured by cell type:
   ``umap_<method>.png`` and all side by side in ``umap.png``, :mod:`epiflow.plots.features`);
5. optionally (:func:`trajectory`) runs PAGA on the cell types and diffusion pseudotime rooted in the
   ``root_type`` cell closest to that type's centroid, and compares the mean pseudotime per type with
   a known order (Spearman) — the haematopoiesis analysis of EpiAgent Fig. 2d-g on Buenrostro 2018.

Metrics table (the long format shared by every task, written as ``metrics.tsv``)
----------------------------------------------------------------------------------
One row per number, tab-separated, with a header::

    task    dataset    method    metric    value

* ``task``: ``feature_extraction`` (clustering rows) or ``trajectory`` (trajectory rows);
* ``dataset``: the evaluated data set; ``method``: the embedding's name (``EpiAgent``, ``LSI``, ...);
* ``metric`` / ``value``: the name and a float. Feature extraction writes ``NMI``, ``ARI``,
  ``ASW_cell_type``, ``n_clusters`` (found), ``n_cell_types`` (wanted), ``leiden_reached`` (1/0),
  ``leiden_resolution``, ``n_cells``, ``n_cells_unlabelled``, ``n_dims``; the trajectory writes
  ``spearman_types`` (mean pseudotime per type vs the order's tiers), ``spearman_types_p``,
  ``spearman_cells`` (per-cell pseudotime vs its type's tier), ``spearman_cells_p``,
  ``n_cells_unreachable`` and ``mean_pseudotime[<type>]`` per type.

:func:`run` computes and returns (a :class:`~epiflow.tasks.common.TaskResult`); ``epiflow
evaluate-features`` (:mod:`epiflow.tasks.cli`) writes the other outputs, each atomically: ``cells.tsv``
(cell, label, Leiden cluster per method, pseudotime per method if the trajectory ran), ``umap.png``,
``umap_<method>.png``, and with the trajectory ``trajectory.tsv`` (per method and type: tier, n_cells,
mean / median / sd pseudotime) and ``trajectory.png``.

:func:`load_feature_inputs` assembles the evaluated AnnData for the CLI (``epiflow evaluate-features``):
embeddings read from ``epiflow embed`` outputs, counts of the same cells from the corpus shards
(or an h5ad), and the LSI baseline computed on those counts. The EpiAgent embeddings can also be
computed by the command from a checkpoint (:mod:`epiflow.tasks.features_finetune`): zero-shot
(method ``EpiAgent``) and after CCA (K = 1) + SR fine-tuning on the evaluated cells (method
``EpiAgent-finetuned``, ``--epochs N``), both evaluated beside LSI, trajectory included.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..cliargs import check_config
from ..errors import ConfigError, EpiflowError, InputFormatError
from ..metrics.table import dataset_label, metric_rows, metrics_frame
from ..metrics import (HEMATOPOIESIS_ORDER, embedding_scores,
                       order_spearman, order_spearman_cells, parse_order)

from .config import FeaturesConfig

log = logging.getLogger(__name__)

TASK = "feature_extraction"
TRAJECTORY_TASK = "trajectory"
DEFAULT_EMBEDDINGS = {"EpiAgent": "X_epiagent", "LSI": "X_lsi"}
# "unknown" is what map-dataset writes for a cell without a label (epiflow.corpus.mapping.MISSING_LABEL)
MISSING_LABELS = {"", "nan", "none", "na", "n/a", "<na>", "unknown"}


def labelled_mask(labels) -> np.ndarray:
    """True where a label is present (not NaN / None / empty / 'nan' / 'None' / 'NA' / 'unknown', in
    any case): unlabelled cells are left out of every label-based metric, never counted as one more
    cell type."""
    s = pd.Series(np.asarray(labels, dtype=object))
    ok = s.notna().to_numpy()
    txt = s.astype(str).str.strip().str.lower()
    return ok & ~txt.isin(MISSING_LABELS).to_numpy()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "method"


def _labels(adata, label_key: str) -> np.ndarray:
    if label_key not in adata.obs:
        raise EpiflowError(f"label column '{label_key}' not in obs (have: {list(adata.obs.columns)})",
                           field=f"obs/{label_key}", fix="pass --label-key with the cell-type column")
    return adata.obs[label_key].to_numpy(dtype=object)


def _embedding(adata, key: str) -> np.ndarray:
    if key not in adata.obsm:
        raise EpiflowError(f"embedding '{key}' not in obsm (have: {sorted(adata.obsm)})", field=f"obsm/{key}",
                           fix="embed the cells first (epiflow embed) or name the right obsm key")
    x = np.asarray(adata.obsm[key], dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != adata.n_obs:
        raise EpiflowError(f"embedding '{key}' has shape {x.shape}, expected ({adata.n_obs}, dims)",
                           field=f"obsm/{key}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise EpiflowError(f"embedding '{key}' has {int(bad.sum())} cells with NaN/inf values",
                           field=f"obsm/{key}", fix="re-run the embedding; check the checkpoint and input")
    return x


# ----------------------------------------------------------------------------- trajectory
def _order_text(order) -> str:
    ranks = parse_order(order)
    tiers: dict[int, list[str]] = {}
    for t, r in ranks.items():
        tiers.setdefault(r, []).append(t)
    return " < ".join(", ".join(tiers[r]) for r in sorted(tiers))


def _root_cell(emb: np.ndarray, labels: np.ndarray, root_type: str) -> int:
    idx = np.flatnonzero(labels == root_type)
    if idx.size == 0:
        raise EpiflowError(f"root cell type '{root_type}' not among the labels ({sorted(set(labels))})",
                           field="root_type", fix="pass --root-type with a type present in the data")
    centroid = emb[idx].mean(axis=0)
    return int(idx[np.argmin(((emb[idx] - centroid) ** 2).sum(axis=1))])


def trajectory(adata, embedding_key: str, *, label_key: str = "cell_type", root_type: str = "HSC",
               order=HEMATOPOIESIS_ORDER, n_neighbors: int = 15, seed: int = 0, n_dcs: int = 10,
               recompute_neighbors: bool | None = None) -> pd.DataFrame:
    """PAGA + diffusion pseudotime on an embedding, compared with a known order of cell types.

    Steps (scanpy): kNN graph on ``obsm[embedding_key]`` (reused if ``uns['neighbors']`` was built on
    that key, unless ``recompute_neighbors``); ``tl.paga`` on ``label_key``; ``tl.diffmap``;
    ``tl.dpt`` rooted at the ``root_type`` cell closest (Euclidean, in the embedding) to the centroid
    of the ``root_type`` cells. Cells the diffusion cannot reach (another connected component) get
    NaN pseudotime and are counted in ``n_cells_unreachable``.

    Modifies ``adata`` in place (``obs['dpt_pseudotime']``, ``uns['paga']``, ``uns['iroot']``,
    ``obsm['X_diffmap']``). Cells with a missing label should be removed first.

    Returns a DataFrame, one row per cell type: ``cell_type``, ``tier`` (its place in ``order``; -1
    if absent), ``n_cells``, ``mean_pseudotime``, ``median_pseudotime``, ``sd_pseudotime``, sorted by
    tier then mean pseudotime. ``.attrs`` holds ``spearman_types`` / ``spearman_types_p`` (per-type
    means vs tiers), ``spearman_cells`` / ``spearman_cells_p`` (per-cell), ``root_cell`` (obs name),
    ``root_type``, ``embedding_key``, ``n_cells_unreachable`` and ``paga_connectivities`` (DataFrame
    of type x type connectivities).
    """
    import scanpy as sc

    from ..metrics import knn_graph

    emb = _embedding(adata, embedding_key)
    labels = np.asarray(_labels(adata, label_key)).astype(str)
    ranks = parse_order(order)
    params = adata.uns.get("neighbors", {}).get("params", {}) if "neighbors" in adata.uns else {}
    if recompute_neighbors is None:
        recompute_neighbors = params.get("use_rep") != embedding_key
    if recompute_neighbors:
        knn_graph(adata, use_rep=embedding_key, n_neighbors=n_neighbors, seed=seed)
    if isinstance(adata.obs[label_key].dtype, pd.CategoricalDtype):
        adata.obs[label_key] = adata.obs[label_key].cat.remove_unused_categories()
    else:
        adata.obs[label_key] = pd.Categorical(labels)
    adj = sp.coo_matrix(adata.obsp["connectivities"])
    codes = adata.obs[label_key].cat.codes.to_numpy()
    n_cats = len(adata.obs[label_key].cat.categories)
    if np.any(codes[adj.row] != codes[adj.col]):
        sc.tl.paga(adata, groups=label_key)
    else:  # scanpy's PAGA fails on a group graph without edges: every type is its own component
        log.warning("trajectory on %s: no kNN edge joins two cell types; PAGA connectivities are all 0 and only "
                    "the root type's cells get a pseudotime", embedding_key)
        zero = sp.csr_matrix((n_cats, n_cats))
        adata.uns["paga"] = {"connectivities": zero, "connectivities_tree": zero, "groups": label_key}
    n_comps = int(min(15, adata.n_obs - 2))
    sc.tl.diffmap(adata, n_comps=n_comps, random_state=seed)
    root = _root_cell(emb, labels, root_type)
    adata.uns["iroot"] = root
    sc.tl.dpt(adata, n_dcs=min(n_dcs, n_comps))
    pt = adata.obs["dpt_pseudotime"].to_numpy(dtype=np.float64)
    pt = np.where(np.isfinite(pt), pt, np.nan)
    adata.obs["dpt_pseudotime"] = pt
    n_unreach = int(np.isnan(pt).sum())
    if n_unreach:
        log.warning("trajectory on %s: %d cells are not connected to the root and have no pseudotime",
                    embedding_key, n_unreach)
    g = pd.DataFrame({"cell_type": labels, "pt": pt}).groupby("cell_type", sort=True)["pt"]
    tab = pd.DataFrame({"n_cells": g.size(), "mean_pseudotime": g.mean(), "median_pseudotime": g.median(),
                        "sd_pseudotime": g.std()}).reset_index()
    tab.insert(1, "tier", [ranks.get(t, -1) for t in tab["cell_type"]])
    tab["_order"] = tab["tier"].where(tab["tier"] >= 0, len(ranks) + 1)  # types not in the order go last
    tab = tab.sort_values(["_order", "mean_pseudotime"]).drop(columns="_order").reset_index(drop=True)
    rho_t, p_t, _ = order_spearman(dict(zip(tab["cell_type"], tab["mean_pseudotime"])), ranks)
    rho_c, p_c, _ = order_spearman_cells(pt, labels, ranks)
    cats = list(adata.obs[label_key].cat.categories)
    con = adata.uns["paga"]["connectivities"]
    con = con.toarray() if sp.issparse(con) else np.asarray(con)
    tab.attrs.update({
        "spearman_types": rho_t, "spearman_types_p": p_t, "spearman_cells": rho_c, "spearman_cells_p": p_c,
        "root_cell": str(adata.obs_names[root]), "root_index": root, "root_type": root_type,
        "embedding_key": embedding_key, "n_cells_unreachable": n_unreach,
        "paga_connectivities": pd.DataFrame(con, index=cats, columns=cats),
    })
    log.info("trajectory on %s: Spearman(mean pseudotime per type, order) = %.3f, per cell = %.3f",
             embedding_key, rho_t, rho_c)
    return tab


# ----------------------------------------------------------------------------- evaluation
def lsi_rows(info: Mapping, dataset: str) -> list[dict]:
    """Metric rows describing the LSI baseline(s) of :func:`load_feature_inputs` (its ``lsi_info``)."""
    rows = metric_rows(TASK, dataset, "LSI", {"lsi_depth_spearman": info["depth_spearman"],
                                              "lsi_dropped_first": int(info["dropped_first"])})
    if "own_features" in info:
        own = info["own_features"]
        rows += metric_rows(TASK, dataset, OWN_FEATURES_METHOD,
                            {"n_features": own["n_features"], "lsi_depth_spearman": own["depth_spearman"],
                             "lsi_dropped_first": int(own["dropped_first"])})
    return rows


def run(adata, cfg: FeaturesConfig | None = None, *, embeddings: Mapping[str, str] | None = None,
        dataset: str | None = None, model=None, cells=None, lsi_info: Mapping | None = None,
        extra_rows=None):
    """Evaluate each embedding of ``adata`` (see the module docstring); nothing is written.

    ``cfg``: the settings (:class:`~epiflow.tasks.config.FeaturesConfig`; default: its defaults).
    ``embeddings``: ``{method name: obsm key}`` (default EpiAgent -> ``X_epiagent``, LSI -> ``X_lsi``;
    every key must exist). ``model`` (with ``cells``, the :class:`~epiflow.corpus.shard.Shard` of the
    same cells in the same order): an EpiAgent whose embeddings are computed here
    (:func:`epiflow.tasks.features_finetune.add_model_embeddings`: zero-shot as method ``EpiAgent``
    unless ``embeddings`` names it, and with ``cfg.epochs`` > 0 after CCA + SR fine-tuning of a copy,
    ``EpiAgent-finetuned``; the LSI methods stay last). ``lsi_info``: the third item of
    :func:`load_feature_inputs` (its rows describe the LSI baselines). ``extra_rows``: further metric
    rows (dicts with the table's columns) appended to the table.

    Returns a :class:`~epiflow.tasks.common.TaskResult`: ``metrics``; ``tables['cells']`` (cell,
    label, Leiden cluster, UMAP coordinates and pseudotime per method) and, with ``cfg.trajectory``,
    ``tables['trajectory']`` (per method and type: tier, n_cells, mean / median / sd pseudotime) and
    ``tables['paga']`` (per method and pair of types: the PAGA connectivity);
    ``data``: ``umap_panels`` / ``trajectory_panels`` (what :func:`epiflow.plots.features.feature_figures`
    draws), ``dataset``, ``label_key``, ``root_type``, ``order``, ``methods``.
    """
    import anndata as ad
    import scanpy as sc

    from .common import TaskResult

    cfg = FeaturesConfig() if cfg is None else cfg
    check_config(cfg)
    label_key = cfg.label_key
    embeddings = dict(DEFAULT_EMBEDDINGS if embeddings is None else embeddings)
    dataset = dataset_label(adata, dataset)
    extra: list[dict] = []
    if model is not None:
        from .features_finetune import FINETUNED_METHOD, ZEROSHOT_METHOD, add_model_embeddings

        if cells is None:
            raise ConfigError("embedding cells with a model needs their tokenized sentences", field="cells",
                              fix="pass the Shard of the evaluated cells (a corpus, not --counts)")
        if cfg.epochs > 0 and FINETUNED_METHOD in embeddings:
            raise EpiflowError(f"method name {FINETUNED_METHOD!r} is reserved for --epochs", field="--embeddings",
                               fix="name the embeddings file otherwise")
        added, extra = add_model_embeddings(
            adata, cells, model, dataset=dataset, epochs=cfg.epochs,
            zero_shot_key="X_epiagent" if ZEROSHOT_METHOD in embeddings else None, lr=cfg.lr,
            batch_tokens=cfg.batch_tokens, max_len=cfg.max_len, seed=cfg.seed, num_heads=cfg.num_heads,
            device=cfg.device, backend=cfg.backend, progress=cfg.progress, sr_objective=cfg.sr_objective)
        baselines = {m: embeddings.pop(m) for m in [k for k in embeddings if k.startswith("LSI")]}
        embeddings.update(added)
        embeddings.update(baselines)  # the LSI rows last
    if lsi_info is not None:
        extra += lsi_rows(lsi_info, dataset)
    if extra_rows:
        extra += list(extra_rows)
    if not embeddings:
        raise EpiflowError("no embedding to evaluate", field="embeddings")
    labels_all = _labels(adata, label_key)
    mask = labelled_mask(labels_all)
    n_unlab = int((~mask).sum())
    if n_unlab:
        log.info("%d of %d cells have no '%s' label and are excluded from the metrics", n_unlab, adata.n_obs,
                 label_key)
    labels = np.asarray(labels_all[mask]).astype(str)
    n_types = int(len(np.unique(labels)))
    if n_types < 2:
        raise EpiflowError(f"need at least 2 labelled cell types in obs['{label_key}'], found {n_types} "
                           f"({mask.sum()} labelled cells)", field=f"obs/{label_key}")
    obs = pd.DataFrame({label_key: pd.Categorical(labels)}, index=adata.obs_names[mask].astype(str))
    embs = {m: _embedding(adata, k)[mask] for m, k in embeddings.items()}  # validate all before work

    n_neighbors, seed = cfg.n_neighbors, cfg.seed
    rows: list[dict] = []
    cells_tab = pd.DataFrame({"cell": obs.index, label_key: labels})
    umap_panels: dict = {}
    traj_panels: dict = {}
    traj_tables = []
    paga_tables: list[pd.DataFrame] = []
    for method, key in embeddings.items():
        sub = ad.AnnData(obs=obs.copy())
        sub.obsm[key] = embs[method]
        log.info("%s (%s, %d dims): Leiden bisection to %d clusters on %d cells", method, key,
                 embs[method].shape[1], n_types, sub.n_obs)
        vals, lab_pred = embedding_scores(sub, labels, n_neighbors=n_neighbors, seed=seed, max_iter=cfg.max_iter,
                                          use_rep=key)
        res, reached = vals["leiden_resolution"], vals["leiden_reached"]
        vals.update({"n_cells": int(mask.sum()), "n_cells_unlabelled": n_unlab, "n_dims": int(embs[method].shape[1])})
        rows += metric_rows(TASK, dataset, method, vals)
        log.info("%s: NMI %.3f ARI %.3f (%d clusters at resolution %.3g%s)", method, vals["NMI"], vals["ARI"],
                 vals["n_clusters"], res, "" if reached else ", target NOT reached")
        cells_tab[f"leiden_{_slug(method)}"] = lab_pred
        title = (f"{method} ({key}, {vals['n_dims']} dims) on {dataset}\n{sub.n_obs} cells; Leiden "
                 f"{vals['n_clusters']}/{n_types} clusters: NMI {vals['NMI']:.3f}, ARI {vals['ARI']:.3f}")
        if cfg.umap:
            sc.tl.umap(sub, random_state=seed)
            umap_panels[method] = (sub.obsm["X_umap"].copy(), labels, title)
            cells_tab[f"umap1_{_slug(method)}"] = sub.obsm["X_umap"][:, 0]
            cells_tab[f"umap2_{_slug(method)}"] = sub.obsm["X_umap"][:, 1]
        if cfg.trajectory:
            tab = trajectory(sub, key, label_key=label_key, root_type=cfg.root_type, order=cfg.order,
                             n_neighbors=n_neighbors, seed=seed)
            tv = {"spearman_types": tab.attrs["spearman_types"], "spearman_types_p": tab.attrs["spearman_types_p"],
                  "spearman_cells": tab.attrs["spearman_cells"], "spearman_cells_p": tab.attrs["spearman_cells_p"],
                  "n_cells_unreachable": tab.attrs["n_cells_unreachable"]}
            tv.update({f"mean_pseudotime[{t}]": v for t, v in zip(tab["cell_type"], tab["mean_pseudotime"])})
            rows += metric_rows(TRAJECTORY_TASK, dataset, method, tv)
            cells_tab[f"pseudotime_{_slug(method)}"] = sub.obs["dpt_pseudotime"].to_numpy()
            t2 = tab.copy()
            t2.attrs = {}
            t2.insert(0, "method", method)
            t2.insert(0, "dataset", dataset)
            traj_tables.append(t2)
            con = tab.attrs["paga_connectivities"]  # type x type, symmetric: one row per pair
            types = [str(t) for t in con.index]
            paga_tables.append(pd.DataFrame(
                [{"dataset": dataset, "method": method, "type_a": types[i], "type_b": types[j],
                  "connectivity": float(con.iat[i, j])}
                 for i in range(len(types)) for j in range(i + 1, len(types))],
                columns=["dataset", "method", "type_a", "type_b", "connectivity"]))
            if cfg.umap:
                con = tab.attrs["paga_connectivities"]
                traj_panels[method] = {"coords": sub.obsm["X_umap"], "labels": labels,
                                       "pseudotime": sub.obs["dpt_pseudotime"].to_numpy(),
                                       "root": tab.attrs["root_index"], "paga": con.to_numpy(),
                                       "paga_types": list(con.index), "table": tab,
                                       "title": f"{method} ({key}) on {dataset}"}
    tables = {"cells": cells_tab}
    if traj_tables:
        tables["trajectory"] = pd.concat(traj_tables, ignore_index=True)
        tables["paga"] = pd.concat(paga_tables, ignore_index=True)
    return TaskResult(metrics=metrics_frame(rows + extra), tables=tables,
                      data={"umap_panels": umap_panels, "trajectory_panels": traj_panels, "dataset": dataset,
                            "label_key": label_key, "root_type": cfg.root_type, "order": _order_text(cfg.order),
                            "methods": embeddings})


# ----------------------------------------------------------------------------- CLI inputs
def _cell_keys(obs: pd.DataFrame, index, use_dataset: bool) -> np.ndarray:
    ids = obs["cell_id"].astype(str).to_numpy() if "cell_id" in obs else np.asarray(index).astype(str)
    if use_dataset:
        return np.char.add(np.char.add(obs["dataset"].astype(str).to_numpy().astype(str), "\x1f"), ids)
    return ids.astype(str)


def corpus_cells(corpus_dir, keys: np.ndarray, *, use_dataset: bool):
    """The given cells of a corpus as one :class:`~epiflow.corpus.shard.Shard`, rows in the order of ``keys``.

    ``keys`` are ``cell_id`` values, or ``dataset + '\\x1f' + cell_id`` when ``use_dataset``.
    Only the wanted rows of each shard are kept in memory. The shard holds the tokens (rank-ordered),
    counts and TF-IDF of each cell: the counts feed LSI, the sentences the EpiAgent model.
    """
    from tqdm.auto import tqdm

    from ..corpus.shard import Shard, open_corpus

    corpus = open_corpus(corpus_dir)
    want = pd.Index(keys)
    if not want.is_unique:
        raise EpiflowError("the embedded cells are not unique (cell_id"
                           + (" + dataset" if use_dataset else "") + ")", field="obs/cell_id")
    shard_obs = corpus.shard_obs()  # choose the rows from the obs, then read only those
    shard_rows, key_parts = [], []
    for obs in shard_obs:
        if "cell_id" not in obs:
            raise InputFormatError("shard has no obs/cell_id column", path=str(corpus.root), field="obs/cell_id")
        if use_dataset and "dataset" not in obs:
            raise InputFormatError("shard has no obs/dataset column", path=str(corpus.root), field="obs/dataset")
        k = _cell_keys(obs, obs.index, use_dataset)
        rows = np.flatnonzero(want.get_indexer(k) >= 0)
        shard_rows.append(rows)
        if rows.size:
            key_parts.append(k[rows])
    found = np.concatenate(key_parts) if key_parts else np.array([], dtype=str)
    pos = pd.Index(found)
    if not pos.is_unique:
        raise InputFormatError("the corpus holds the same cell more than once", path=str(corpus.root),
                               field="obs/cell_id", fix="rebuild the corpus with unique cell ids")
    idx = pos.get_indexer(want)
    if (idx < 0).any():
        miss = want[idx < 0]
        raise EpiflowError(f"{len(miss)} embedded cells are not in the corpus (e.g. {list(miss[:3])})",
                           path=str(corpus.root), field="obs/cell_id",
                           fix="use the corpus the embeddings were computed from")
    parts = [sh for sh in tqdm(corpus.read_rows(shard_rows, shard_obs), total=len(shard_rows),
                               desc="reading shards", unit="shard") if sh.n_cells]
    return Shard.concat(parts).subset(idx)


def load_feature_inputs(embeddings: Mapping[str, str | os.PathLike] | None = None, *, corpus=None,
                        counts_h5ad=None, embedding_key: str = "X_epiagent", label_key: str = "cell_type",
                        dataset: str | None = None, lsi_components: int = 50, lsi_drop_first="auto",
                        seed: int = 0, return_cells: bool = False, lsi_recipe: str | None = None,
                        own_features_h5ad=None):
    """Assemble the AnnData evaluated by ``epiflow evaluate-features``.

    ``embeddings``: ``{method: path}`` of ``epiflow embed`` outputs (AnnData with ``obsm[embedding_key]``
    and the shard ``obs``); all must hold the same cells. Counts for the LSI baseline come from the
    ``corpus`` folder (cells matched on ``cell_id``, plus ``dataset`` when both sides have it) or from
    ``counts_h5ad`` (its ``X``, cells matched on ``obs_names``). Without embeddings the cells and labels
    are those of ``counts_h5ad``/the corpus and only LSI is evaluated. ``dataset`` keeps only the cells
    whose ``obs['dataset']`` equals it. ``lsi_recipe``: :func:`epiflow.baselines.lsi` recipe (None = its default).
    ``own_features_h5ad``: the dataset's own cell x peak matrix (e.g. the published h5ad a downstream dataset
    was mapped from): LSI on it, same recipe, is added as method ``LSI-own-features`` (key
    ``X_lsi_own_features``), the cells matched on their ``barcode`` (the source file's obs_names).

    Returns ``(adata, methods, lsi_info)``: ``adata.obsm`` holds ``X_<method>`` per embedding and
    ``X_lsi``; ``methods`` maps method names to those keys (LSI last). With ``return_cells`` a fourth
    item is the :class:`~epiflow.corpus.shard.Shard` of the same cells in the same order (tokens for
    the EpiAgent model; None when the counts come from ``counts_h5ad``).
    """
    import anndata as ad

    from ..baselines import lsi

    if corpus is None and counts_h5ad is None:
        raise EpiflowError("give a corpus (--corpus) or a counts h5ad (--counts) for the LSI baseline",
                           field="corpus")
    methods: dict[str, str] = {}
    base = None
    cells = None
    for i, (name, path) in enumerate((embeddings or {}).items()):
        path = Path(path)
        if not path.exists():
            raise InputFormatError("embeddings file does not exist", path=str(path), fix="run epiflow embed first")
        try:
            e = ad.read_h5ad(path)
        except Exception as exc:  # noqa: BLE001 - any reader failure is a user input problem
            raise InputFormatError(f"not a readable h5ad ({exc})", path=str(path)) from None
        if embedding_key not in e.obsm:
            raise InputFormatError(f"no obsm['{embedding_key}'] (have: {sorted(e.obsm)})", path=str(path),
                                   field=f"obsm/{embedding_key}", fix="pass --embedding-key or re-run epiflow embed")
        if dataset is not None:
            if "dataset" not in e.obs:
                raise InputFormatError("obs has no 'dataset' column to select --dataset", path=str(path),
                                       field="obs/dataset")
            e = e[e.obs["dataset"].astype(str).to_numpy() == dataset].copy()
            if e.n_obs == 0:
                raise EpiflowError(f"no cell of dataset '{dataset}'", path=str(path), field="obs/dataset")
        key = f"X_{_slug(name).lower()}"
        if key == "X_lsi":
            raise EpiflowError("the method name 'LSI' is reserved for the baseline", field="embeddings")
        if base is None:
            base = ad.AnnData(obs=e.obs.copy())
            base.obs_names = e.obs_names.astype(str)
            base.obsm[key] = np.asarray(e.obsm[embedding_key], dtype=np.float32)
        else:
            k0 = _cell_keys(base.obs, base.obs_names, False)
            k1 = pd.Index(_cell_keys(e.obs, e.obs_names, False))
            idx = k1.get_indexer(k0)
            if (idx < 0).any() or e.n_obs != base.n_obs:
                raise EpiflowError("embedding files hold different cells", path=str(path), field="obs/cell_id",
                                   fix="embed the same corpus / dataset with each model")
            base.obsm[key] = np.asarray(e.obsm[embedding_key], dtype=np.float32)[idx]
        methods[name] = key

    if counts_h5ad is not None:
        c = ad.read_h5ad(counts_h5ad)
        if dataset is not None and base is None:
            if "dataset" not in c.obs:
                raise InputFormatError("obs has no 'dataset' column to select --dataset", path=str(counts_h5ad),
                                       field="obs/dataset")
            c = c[c.obs["dataset"].astype(str).to_numpy() == dataset].copy()
        if base is None:
            base = ad.AnnData(obs=c.obs.copy())
            base.obs_names = c.obs_names.astype(str)
            counts = sp.csr_matrix(c.X)
        else:
            keys = _cell_keys(base.obs, base.obs_names, False)
            idx = pd.Index(c.obs_names.astype(str)).get_indexer(keys)
            if (idx < 0).any():
                raise EpiflowError(f"{int((idx < 0).sum())} embedded cells are not in the counts file",
                                   path=str(counts_h5ad), fix="pass the h5ad the embeddings were computed from")
            counts = sp.csr_matrix(c.X)[idx]
    else:
        if base is None:
            from ..corpus.shard import open_corpus

            cobs = pd.concat(open_corpus(corpus).shard_obs(), ignore_index=True)
            if dataset is not None:
                if "dataset" not in cobs:
                    raise InputFormatError("the shards have no obs/dataset column to select --dataset",
                                           path=str(corpus), field="obs/dataset")
                cobs = cobs[cobs["dataset"].astype(str) == dataset]
            cobs = cobs.reset_index(drop=True)
            cobs.index = cobs["cell_id"].astype(str).to_numpy() if "cell_id" in cobs else cobs.index.astype(str)
            base = ad.AnnData(obs=cobs)
        use_ds = "dataset" in base.obs
        cells = corpus_cells(corpus, _cell_keys(base.obs, base.obs_names, use_ds), use_dataset=use_ds)
        counts, cobs = cells.counts_csr(), cells.obs
        if label_key not in base.obs and label_key in cobs:
            base.obs[label_key] = cobs[label_key].to_numpy()
    if base.n_obs == 0:
        raise EpiflowError("no cells to evaluate" + (f" for dataset '{dataset}'" if dataset else ""),
                           field="dataset")
    emb, info = lsi(counts, n_components=lsi_components, drop_first=lsi_drop_first, seed=seed, return_info=True,
                    recipe=lsi_recipe)
    base.obsm["X_lsi"] = emb
    methods["LSI"] = "X_lsi"
    if own_features_h5ad is not None:
        keys = _source_barcodes(base.obs, cells.obs if cells is not None else None)
        own = own_feature_counts(own_features_h5ad, keys)
        emb_own, info_own = lsi(own, n_components=lsi_components, drop_first=lsi_drop_first,
                                seed=seed, return_info=True, recipe=lsi_recipe)
        base.obsm[OWN_FEATURES_KEY] = emb_own
        methods[OWN_FEATURES_METHOD] = OWN_FEATURES_KEY
        info["own_features"] = {"n_features": int(own.shape[1]), "depth_spearman": info_own["depth_spearman"],
                                "dropped_first": info_own["dropped_first"]}
    return (base, methods, info, cells) if return_cells else (base, methods, info)


OWN_FEATURES_METHOD = "LSI-own-features"
OWN_FEATURES_KEY = "X_lsi_own_features"


def _source_barcodes(obs: pd.DataFrame, cell_obs: pd.DataFrame | None) -> np.ndarray:
    """The cells' names in the file they were read from: obs 'barcode', else the cell id after 'dataset:'."""
    for frame in (cell_obs, obs):
        if frame is not None and "barcode" in frame:
            return frame["barcode"].astype(str).to_numpy()
    ids = obs["cell_id"].astype(str) if "cell_id" in obs else pd.Series(obs.index.astype(str))
    return ids.str.split(":", n=1).str[-1].to_numpy()


def own_feature_counts(path, barcodes: np.ndarray) -> sp.csr_matrix:
    """Rows of the h5ad at ``path`` (a cell x feature count matrix in X) for ``barcodes``, in that order."""
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise InputFormatError("own-features file does not exist", path=str(path), field="--own-features",
                               fix="pass the cell x peak h5ad the dataset was mapped from")
    try:
        a = ad.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a user input problem
        raise InputFormatError(f"not a readable h5ad ({exc})", path=str(path), field="--own-features") from None
    names = pd.Index(a.obs_names.astype(str))
    if not names.is_unique:
        raise InputFormatError(f"{int(names.duplicated().sum())} duplicated cell names (obs_names)", path=str(path),
                               field="obs_names", fix="make the cell names unique (adata.obs_names_make_unique())")
    idx = names.get_indexer(pd.Index(barcodes))
    if (idx < 0).any():
        miss = np.asarray(barcodes)[idx < 0]
        raise EpiflowError(f"{len(miss)} of {len(barcodes)} evaluated cells are not in the own-features file "
                           f"(e.g. {', '.join(map(str, miss[:3]))})", path=str(path), field="obs_names",
                           fix="pass the h5ad the dataset was mapped from (cells are matched on their barcode)")
    return sp.csr_matrix(a.X, dtype=np.float32)[idx]
