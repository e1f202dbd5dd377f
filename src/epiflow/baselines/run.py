"""Run a baseline on a task and score it in the common long metrics table.

* :func:`load_counts` — raw counts of a corpus (shards + ``vocab.bed``) or an h5ad, optionally one
  dataset;
* :func:`canonical_input` — the adapter's AnnData (:mod:`epiflow.baselines.base`) with the paper's
  per-task preprocessing: annotation gets the same stratified 2/3 reference, 1/3 query split as
  EpiAgent (:func:`epiflow.tasks.split.stratified_split`, the one function both use) with query labels hidden; imputation
  keeps the cCREs open in >= 3 % of all cells and is scored against their raw TF-IDF, as EpiAgent's task; perturbation keeps the top-50,000 most accessible cCREs and
  removes the held-out cell type's perturbed cells (:func:`stimulation_types`: the types EpiAgent's
  stimulation task holds out); genetic keeps the top-50,000 most accessible
  cCREs and removes the cells of the held-out perturbations (EpiAgent's own seeded split,
  :func:`epiflow.tasks.perturbation.holdout_split`, over the perturbations with >= 3 cells);
* :func:`run_baseline` — runs the adapter in-process or in the tool's venv (``env='auto'`` uses the
  registry's default);
* :func:`evaluate` — metric rows (``task, dataset, method, metric, value``) with the same metric
  functions as the EpiAgent tasks, plus ``runtime_s``;
* :func:`leave_one_type_out` — the stimulation benchmark as EpiAgent's ``predict-stimulation`` runs it:
  the tool is fitted once per held-out cell type, rows ``metric[type]`` per type and their means
  (:func:`epiflow.tasks.perturbation._summary_rows`), and the Fig. 3g UMAPs of its predicted cells
  (:func:`epiflow.tasks.perturbation.stimulation_umaps`).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import EpiflowError, InputFormatError
from ..tasks.split import stratified_split
from ..tokenize.core import binarize
from .base import BaselineOutput, get_adapter
from .preprocess import accessible_cells, top_accessible

log = logging.getLogger(__name__)

ENVS = ("auto", "inprocess", "venv")


def load_counts(*, corpus=None, counts=None, dataset: str | None = None, keep_tfidf: bool = False):
    """AnnData of raw counts (X CSR float32, obs, var with chrom/start/end when known); ``dataset``: only
    the cells of that obs['dataset'] (comma-separated names: of any of them). ``keep_tfidf``: keep a
    corpus' TF-IDF (``layers['tfidf']``, the imputation task's reference); other layers are dropped."""
    import anndata as ad

    if (corpus is None) == (counts is None):
        raise EpiflowError("give exactly one of a corpus folder or a counts h5ad", field="input")
    if counts is not None:
        try:
            a = ad.read_h5ad(counts)
        except Exception as exc:  # noqa: BLE001
            raise InputFormatError(f"not a readable h5ad ({exc})", path=str(counts)) from None
        a.X = sp.csr_matrix(a.X, dtype=np.float32)
    else:
        from ..corpus.shard import open_corpus

        folders = [open_corpus(x) for x in (corpus if isinstance(corpus, (list, tuple)) else [corpus])]
        vocab = folders[0].vocab()
        for other, path in zip(folders[1:], list(corpus)[1:] if isinstance(corpus, (list, tuple)) else []):
            if other.vocab_id != folders[0].vocab_id or not other.vocab().equals(vocab):
                raise InputFormatError("the corpus folders read together have different vocabularies", path=str(path),
                                       fix="read together only the corpus and the downstream folders tokenized onto it")
        var = vocab.copy()
        var.index = (vocab["chrom"] + ":" + vocab["start"].astype(str) + "-" + vocab["end"].astype(str)).to_numpy()
        parts = [s.to_anndata(var=var) for c in folders for s in c.iter_shards()]
        a = ad.concat(parts, merge="first") if len(parts) > 1 else parts[0]
        a.var = var
        a.X = sp.csr_matrix(a.X, dtype=np.float32)
        for k in list(a.layers):
            if not (keep_tfidf and k == "tfidf"):
                del a.layers[k]
    if dataset is not None:
        if "dataset" not in a.obs:
            raise InputFormatError("obs has no 'dataset' column to select --dataset", path=str(counts or corpus),
                                   field="obs/dataset")
        names = [d for d in str(dataset).split(",") if d]  # several: 'a,b,c' (e.g. an integration's batches)
        have = a.obs["dataset"].astype(str).to_numpy()
        missing = [d for d in names if not (have == d).any()]
        if missing:
            raise EpiflowError(f"no cell of dataset {', '.join(map(repr, missing))} (have: "
                               f"{', '.join(sorted(set(have)))})", path=str(counts or corpus), field="obs/dataset")
        a = a[np.isin(have, names)].copy()
    a.obs_names = a.obs_names.astype(str)
    a.obs_names_make_unique()
    return a


def _column(adata, key: str, what: str) -> np.ndarray:
    if key not in adata.obs:
        raise EpiflowError(f"{what} column '{key}' not in obs (have: {list(adata.obs.columns)})",
                           field=f"obs/{key}", fix=f"pass the right --{what.replace(' ', '-')}-key")
    return adata.obs[key].astype(str).to_numpy()


def stimulation_types(adata, *, label_key: str = "cell_type", condition_key: str = "condition",
                      control: str = "control", min_cells: int = 3, holdout=None) -> list[str]:
    """The cell types that the stimulation benchmark holds out, by the rule of EpiAgent's task
    (:func:`epiflow.tasks.perturbation.run_stimulation`): among the cells with a cell type and a
    condition, the types (sorted) with >= ``min_cells`` control and >= ``min_cells`` perturbed cells;
    at least two are needed (leave-one-type-out trains on the others). ``holdout``: only these (each
    must be such a type); default: every one."""
    from ..tasks.features import labelled_mask

    labels = _column(adata, label_key, "label")
    cond = _column(adata, condition_key, "condition")
    keep = (labelled_mask(adata.obs[label_key].to_numpy(dtype=object))
            & labelled_mask(adata.obs[condition_key].to_numpy(dtype=object)))
    is_ctrl = cond == control
    if not (keep & is_ctrl).any():
        raise EpiflowError(f"no cell has {condition_key} == {control!r} (values: {sorted(set(cond[keep]))[:10]})",
                           field=f"obs/{condition_key}", fix="pass --control with the label of the unperturbed cells")
    types = [t for t in sorted(set(labels[keep]))
             if (keep & is_ctrl & (labels == t)).sum() >= min_cells
             and (keep & ~is_ctrl & (labels == t)).sum() >= min_cells]
    if len(types) < 2:
        raise EpiflowError(f"leave-one-cell-type-out needs >= 2 cell types with >= {min_cells} control and "
                           f"perturbed cells each; usable: {types}", field=f"obs/{label_key}")
    if not holdout:
        return types
    unknown = [h for h in holdout if h not in types]
    if unknown:
        raise EpiflowError(f"held-out cell type(s) {unknown} lack >= {min_cells} control and perturbed cells "
                           f"(usable: {types})", field="holdout")
    return list(dict.fromkeys(holdout))


def canonical_input(adata, task: str, *, label_key: str = "cell_type", batch_key: str | None = "batch",
                    condition_key: str = "condition", control: str = "control", holdout: str | None = None,
                    query_fraction: float = 1 / 3, seed: int = 0, min_cell_fraction: float = 0.03,
                    top_n: int = 50_000, perturbation_key: str = "perturbation", holdout_fraction: float = 0.25,
                    min_cells: int = 3, label_map: dict[str, str] | None = None, max_cells: int | None = None,
                    common_ccres: bool = False):
    """(adapter input AnnData, evaluation context dict) for ``task`` (see the module docstring).

    The cells, split and features are those of EpiAgent's task with the same settings: feature
    extraction and imputation give the tool every cell (as EpiAgent embeds / imputes every cell) and
    score the labelled ones; imputation keeps the cCREs open in >= ``min_cell_fraction`` of all cells
    and scores against the raw TF-IDF (``layers['tfidf']``: a corpus' own, as EpiAgent's task); annotation
    splits the labelled cells by ``query_fraction`` and ``seed``; integration draws ``max_cells`` cells
    as ``integrate --max-cells`` does (:func:`epiflow.tasks.common.random_rows`), maps the labels with
    ``label_map`` and, with ``common_ccres``, keeps the cCREs accessible in every batch."""
    import anndata as ad

    from ..tasks.features import labelled_mask

    if task == "integration" and max_cells is not None and adata.n_obs > int(max_cells):
        from ..tasks.common import random_rows

        adata = adata[random_rows(adata.n_obs, int(max_cells), seed)]
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    if task == "genetic":
        return _genetic_input(adata, x, perturbation_key=perturbation_key, control=control, holdout=holdout,
                              holdout_fraction=holdout_fraction, seed=seed, top_n=top_n, min_cells=min_cells,
                              label_key=label_key)
    labels = _column(adata, label_key, "label") if label_key in adata.obs or task != "integration" else None
    labelled = np.ones(adata.n_obs, dtype=bool)
    if labels is not None:
        raw_labels = adata.obs[label_key].to_numpy(dtype=object)
        if label_map is not None and task == "integration":  # integrate's --label-map
            from ..tasks.zeroshot import apply_label_map

            raw_labels = apply_label_map(raw_labels, label_map)
        labelled = labelled_mask(raw_labels)
        labels = np.where(labelled, raw_labels, "").astype(str)
        if (~labelled).any():
            log.info("%d cells without a '%s' label are left out of the scores", int((~labelled).sum()), label_key)
    # the cells given to the tool: the labelled ones where labels define the task, else all of them
    keep = labelled.copy() if task in ("annotation", "perturbation") else np.ones(adata.n_obs, dtype=bool)
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    if labels is not None:
        obs["label"] = labels
    if batch_key and batch_key in adata.obs:
        obs["batch"] = adata.obs[batch_key].astype(str).to_numpy()
    elif task == "integration":
        raise EpiflowError(f"integration needs a batch column; '{batch_key}' is not in obs",
                           field=f"obs/{batch_key}", fix="pass --batch-key")
    for c in ("cell_id", "dataset"):
        if c in adata.obs:
            obs[c] = adata.obs[c].astype(str).to_numpy()
    var = adata.var.copy()
    features = np.arange(x.shape[1])
    ctx: dict = {"task": task}
    if task in ("feature_extraction", "imputation", "integration") and labels is not None:
        ctx["labelled"] = labelled
    if task == "integration" and common_ccres:
        batches = obs["batch"].to_numpy()
        covered = [accessible_cells(x[batches == b]) > 0 for b in sorted(set(batches))]
        features = np.flatnonzero(np.logical_and.reduce(covered))
        if features.size == 0:
            raise EpiflowError("the batches have no accessible cCRE in common", field="common_ccres",
                               fix="integrate without --common-ccres")
        log.info("keeping the %d cCREs accessible in every batch (of %d)", features.size, x.shape[1])
    if task == "imputation":
        from ..metrics.imputation import open_fraction_filter

        if labels is None or len(set(labels[labelled])) < 2:
            raise EpiflowError(f"imputation is scored on >= 2 labelled cell types in obs['{label_key}']",
                               field=f"obs/{label_key}")
        features = np.flatnonzero(open_fraction_filter(x, min_cell_fraction))
        if features.size < 3:
            raise EpiflowError(f"only {features.size} features are open in >= {min_cell_fraction:.0%} of the cells",
                               field="min_cell_fraction", fix="lower --min-cell-fraction")
        ctx["reference"], ctx["reference_kind"] = _raw_tfidf(adata, x, features, labelled)
        ctx["truth"] = labels[labelled]
        ctx["n_vocabulary"] = x.shape[1]
    if task == "annotation":
        is_query = stratified_split(labels[keep], query_fraction, seed)
        split = np.full(adata.n_obs, "", dtype=object)
        split[np.flatnonzero(keep)] = np.where(is_query, "query", "reference")
        obs["split"] = split
        ctx["truth"] = labels[keep].copy()
        ctx["is_query"] = is_query
        obs.loc[obs["split"] == "query", "label"] = ""
    if task == "perturbation":
        cond = _column(adata, condition_key, "condition")
        keep = keep & labelled_mask(adata.obs[condition_key].to_numpy(dtype=object))
        if control not in set(cond[keep]):
            raise EpiflowError(f"no '{control}' cell in obs['{condition_key}']", field=f"obs/{condition_key}",
                               fix="pass --control with the label of the unperturbed cells")
        perturbed = cond != control
        if holdout is None:
            holdout = stimulation_types(adata, label_key=label_key, condition_key=condition_key, control=control,
                                        min_cells=min_cells)[0]
        if holdout not in set(labels[keep]):
            raise EpiflowError(f"holdout cell type '{holdout}' not in obs['{label_key}']", field="holdout")
        features = top_accessible(x[keep], top_n)
        held = keep & perturbed & (labels == holdout)
        ctrl = keep & ~perturbed & (labels == holdout)
        names = (adata.obs["cell_id"].astype(str).to_numpy() if "cell_id" in adata.obs
                 else np.asarray(adata.obs_names, dtype=str))
        ctx.update(holdout=holdout, real_pert=x[held][:, features], real_ctrl=x[ctrl][:, features],
                   pert_names=names[held], ctrl_names=names[ctrl])
        keep = keep & ~held
        obs["condition"] = np.where(perturbed, "perturbed", "control")
    sub = ad.AnnData(X=x[keep][:, features], obs=obs.iloc[np.flatnonzero(keep)].copy(),
                     var=var.iloc[features].copy())
    if task == "perturbation":
        sub.uns["holdout"] = holdout
    ctx["features"] = features
    ctx["obs"] = adata.obs.iloc[np.flatnonzero(keep)].copy()
    return sub, ctx


def _raw_tfidf(adata, x, features, labelled) -> tuple[np.ndarray, str]:
    """The imputation task's reference: the raw TF-IDF of the labelled cells over ``features`` (float32,
    dense), as EpiAgent's task scores against it; and where it came from. A corpus' own TF-IDF
    (``layers['tfidf']``, :func:`load_counts` with ``keep_tfidf``) is the task's exactly; an h5ad without
    it is TF-IDF-transformed with ``var['df']`` when present, else with its own cells' document frequency."""
    from ..tokenize.core import global_tfidf

    if "tfidf" in adata.layers:
        tf, kind = sp.csr_matrix(adata.layers["tfidf"], dtype=np.float32), "corpus TF-IDF"
    else:
        if "df" in adata.var:
            df, kind = adata.var["df"].to_numpy(dtype=np.float64), "TF-IDF with var['df']"
        else:
            n_open = accessible_cells(x).astype(np.float64)
            df, kind = np.where(n_open > 0, n_open / max(x.shape[0], 1), 1.0), "TF-IDF with the cells' own df"
            log.warning("imputation: no corpus TF-IDF and no var['df']; the reference is the %s", kind)
        tf = sp.csr_matrix(global_tfidf(x, df), dtype=np.float32)
    tf = tf[:, features]
    return np.asarray((tf if labelled.all() else tf[np.flatnonzero(labelled)]).toarray(), dtype=np.float32), kind


def _genetic_input(adata, x, *, perturbation_key, control, holdout, holdout_fraction, seed, top_n, min_cells,
                   label_key):
    """Input of the ``genetic`` task (see the module docstring)."""
    import anndata as ad

    from ..tasks.perturbation import holdout_split

    from ..tasks.features import labelled_mask

    lab = _column(adata, perturbation_key, "perturbation")
    is_set = labelled_mask(adata.obs[perturbation_key].to_numpy(dtype=object))  # as EpiAgent's labelled_cells
    is_ctrl = is_set & (lab == control)
    if is_ctrl.sum() < min_cells:
        raise EpiflowError(f"{int(is_ctrl.sum())} cells have {perturbation_key} == {control!r}; need >= {min_cells}",
                           field=f"obs/{perturbation_key}", fix="pass --control with the control label")
    counts = pd.Series(lab[is_set & ~is_ctrl]).value_counts()
    perts = sorted(counts[counts >= min_cells].index)
    if holdout:
        held = sorted(h.strip() for h in (holdout.split(",") if isinstance(holdout, str) else holdout) if h.strip())
        bad = [h for h in held if h not in perts]
        if bad:
            raise EpiflowError(f"held-out perturbation(s) {bad} are not among {perts[:20]}", field="holdout")
        train = [p for p in perts if p not in held]
    else:
        train, held = holdout_split(perts, holdout_fraction, seed)
    use = is_ctrl | np.isin(lab, perts)
    features = top_accessible(x[use], top_n)
    keep = is_ctrl | np.isin(lab, train)
    obs = pd.DataFrame({"perturbation": lab}, index=adata.obs_names.astype(str))
    if label_key in adata.obs:
        obs["label"] = adata.obs[label_key].astype(str).to_numpy()
    sub = ad.AnnData(X=x[keep][:, features], obs=obs.iloc[np.flatnonzero(keep)].copy(),
                     var=adata.var.iloc[features].copy())
    sub.uns["heldout"] = np.asarray(held, dtype=str)
    sub.uns["control"] = control
    ctx = {"task": "genetic", "features": features, "heldout": held, "train": train,
           "real_ctrl": x[is_ctrl][:, features], "real_pert": {p: x[lab == p][:, features] for p in held},
           "obs": adata.obs.iloc[np.flatnonzero(keep)].copy()}
    log.info("genetic: %d controls, %d perturbations (%d train, %d held out: %s), %d features",
             int(is_ctrl.sum()), len(perts), len(train), len(held), held, len(features))
    return sub, ctx


def run_baseline(tool: str, adata, task: str, params: dict | None = None, *, env: str = "auto", cache=None,
                 envs_dir=None, timeout: int | None = None, threads: int | None = None) -> BaselineOutput:
    """Run ``tool``'s adapter on the canonical ``adata``; ``env``: auto / inprocess / venv."""
    spec = get_adapter(tool, task)
    if env not in ENVS:
        raise EpiflowError(f"env must be one of {ENVS}, got {env!r}", field="env")
    mode = spec.default_env if env == "auto" else env
    params = dict(params or {})
    t0 = time.perf_counter()
    if mode == "inprocess":
        out = spec.load()(adata, task, params)
        out.info.setdefault("fit_seconds", time.perf_counter() - t0)
    else:
        from .venv import run_in_venv

        out = run_in_venv(tool, adata, task, params, cache=cache, envs_dir=envs_dir, timeout=timeout,
                          threads=threads)
    out.check(task, adata.n_obs)
    out.info["env_mode"] = mode
    out.info["runtime_s"] = time.perf_counter() - t0
    return out


def evaluate(out: BaselineOutput, adata, ctx: dict, *, dataset: str, method: str, seed: int = 0,
             n_neighbors: int = 15, max_iter: int = 30, n_pcs: int = 50, ks=None, n_top: int = 1000,
             tie_correct: bool = False) -> list[dict]:
    """Metric rows of one baseline run (the long table of :mod:`epiflow.tasks.features`), each task
    scored by the function that scores EpiAgent's task, on the cells it scores:

    * feature extraction: :func:`epiflow.metrics.embedding_scores` on the labelled cells (``n_neighbors``,
      ``max_iter``, ``seed``: evaluate-features' settings);
    * integration: :func:`epiflow.tasks.integration.evaluate_integration` (labelled cells; its kNN
      sizes);
    * annotation: :func:`epiflow.metrics.classification.classification_scores` on the query cells;
    * imputation: :func:`epiflow.metrics.imputation.evaluate_imputation` of the labelled cells against
      the per-type mean of their raw TF-IDF (``n_pcs``; the task's kNN size), as impute scores EpiAgent;
    * perturbation, genetic: as EpiAgent's (``ks``: the top-k DA cCREs of the direction accuracy,
      default :data:`epiflow.metrics.perturbation.DEFAULT_KS`; ``n_top``: the top-n DA cCREs of R^2,
      Pearson and Wasserstein): rows ``metric[group]`` per held-out group and their means (one held-out
      type here; :func:`leave_one_type_out` holds out each in turn).
    """
    from ..metrics.table import metric_rows

    task = ctx["task"]
    v: dict[str, float] = {"n_cells": adata.n_obs, "n_features": adata.n_vars}
    labels = adata.obs["label"].astype(str).to_numpy() if "label" in adata.obs else None
    labelled = ctx.get("labelled")
    if task == "feature_extraction":
        from ..metrics import embedding_scores

        emb = np.asarray(out.embedding, np.float32)
        lab = np.ones(adata.n_obs, dtype=bool) if labelled is None else labelled
        if labels is not None and len(np.unique(labels[lab])) >= 2:
            vals, _ = embedding_scores(emb[lab], labels[lab], n_neighbors=n_neighbors, seed=seed, max_iter=max_iter)
            v.update(vals)
        v.update({"n_cells": int(lab.sum()), "n_cells_unlabelled": int((~lab).sum()), "n_dims": emb.shape[1]})
    elif task == "integration":
        emb = np.asarray(out.embedding, np.float32)
        batches = adata.obs["batch"].astype(str).to_numpy()
        v["n_dims"] = emb.shape[1]
        if labels is None:
            from ..metrics.integration import integration_scores

            v.update(integration_scores(emb, batches, seed=seed))
        else:
            from ..tasks.integration import evaluate_integration

            lab_obj = np.where(labelled, labels, None) if labelled is not None else labels
            rows, _, _ = evaluate_integration({method: emb}, batches, lab_obj, dataset=dataset, seed=seed,
                                              umap=False)
            extra = {"n_features": adata.n_vars, "n_dims": emb.shape[1],
                     "runtime_s": float(out.info.get("runtime_s", np.nan))}
            return rows + metric_rows(task, dataset, method, extra)
    elif task == "annotation":
        from ..metrics.classification import classification_scores

        q = ctx["is_query"]
        v.update(classification_scores(ctx["truth"][q], np.asarray(out.labels).astype(str)[q]))
        v["n_query"] = int(q.sum())
    elif task == "imputation":
        from ..metrics.imputation import N_NEIGHBORS, evaluate_imputation

        imp = np.asarray(out.imputed, np.float32)
        imp = imp if labelled.all() else imp[labelled]
        scores, _ = evaluate_imputation({method: imp}, ctx["truth"], ctx["reference"], n_pcs=n_pcs,
                                        n_neighbors=N_NEIGHBORS, seed=seed)
        v.update(scores[method])
        v.update({"n_cells": int(labelled.sum()), "n_ccres_kept": adata.n_vars,
                  "n_ccres_total": int(ctx.get("n_vocabulary", adata.n_vars))})
    elif task == "perturbation":
        from ..tasks.perturbation import STIM_TASK, _summary_rows

        values, _, _ = stimulation_group(out, ctx, method=method, ks=ks, n_top=n_top, seed=seed,
                                         tie_correct=tie_correct)
        extra = {method: {"n_features": len(ctx["features"]), "n_heldout_types": 1}}
        return _summary_rows(STIM_TASK, dataset, {ctx["holdout"]: values}, extra)
    elif task == "genetic":
        return _genetic_rows(out, ctx, dataset=dataset, method=method, seed=seed, ks=ks, n_top=n_top,
                             tie_correct=tie_correct)
    v["runtime_s"] = float(out.info.get("runtime_s", np.nan))
    return metric_rows(task, dataset, method, v)


def _genetic_rows(out: BaselineOutput, ctx: dict, *, dataset: str, method: str, seed: int, ks=None,
                  n_top: int = 1000, tie_correct: bool = False) -> list[dict]:
    """Per held-out perturbation, the metrics of EpiAgent's genetic task
    (:func:`epiflow.tasks.perturbation.evaluate_group`: Pearson of the mean accessibility and of its
    change from the controls over the top-1,000 DA cCREs, direction accuracies); the predicted change
    is the prediction minus the real controls' mean. Rows (task ``genetic_perturbation``, EpiAgent's):
    means over the groups, then ``[group]``."""
    from ..metrics.perturbation import DEFAULT_KS
    from ..tasks.perturbation import GENE_TASK, _summary_rows, evaluate_group

    groups = np.asarray(out.groups).astype(str)
    pred = np.asarray(out.predicted, np.float64)
    X_ctrl = binarize(ctx["real_ctrl"])
    real_ctrl = np.asarray(X_ctrl.mean(0)).ravel()
    per_group = {}
    for p in ctx["heldout"]:
        rows = np.flatnonzero(groups == p)
        if rows.size == 0:
            raise EpiflowError(f"{method} returned no prediction for the held-out perturbation {p!r}", field="groups")
        m = pred[rows].mean(0)
        X_pert = binarize(ctx["real_pert"][p])
        predicted = {method: {"mean": m, "change": m - real_ctrl}}
        values, _, info = evaluate_group(X_ctrl=X_ctrl, X_pert=X_pert, predicted=predicted, task=GENE_TASK, seed=seed,
                                         ks=list(ks or DEFAULT_KS), n_top=n_top, tie_correct=tie_correct)
        values[method].update(n_cells_perturbed=info["n_pert"])
        per_group[p] = values
    extra = {method: {"n_heldout_perturbations": len(ctx["heldout"]), "n_train_perturbations": len(ctx["train"]),
                      "n_features": len(ctx["features"]), "runtime_s": float(out.info.get("runtime_s", np.nan))}}
    return _summary_rows(GENE_TASK, dataset, per_group, extra)


def stimulation_group(out: BaselineOutput, ctx: dict, *, method: str, ks=None, n_top: int = 1000, seed: int = 0,
                      max_ot_cells: int = 2000, tie_correct: bool = False):
    """Metrics of one held-out type as EpiAgent's stimulation task scores its methods
    (:func:`epiflow.tasks.perturbation.evaluate_group`, on the 0/1 accessibility of the real cells):
    the tool's predicted mean is the mean of its predicted cells, its change that mean minus the real
    control cells' mean; its cells enter the Wasserstein distance (and the UMAPs) when there is one per
    control cell of the type (scGen and scPRAM decode each control cell; the rows follow the controls'
    order). Returns (values, ``{method: prediction}`` for :func:`stimulation_umaps`, the per-cCRE frame)."""
    from ..metrics.perturbation import DEFAULT_KS
    from ..tasks.perturbation import STIM_TASK, evaluate_group

    X_ctrl, X_pert = binarize(ctx["real_ctrl"]), binarize(ctx["real_pert"])
    if X_ctrl.shape[0] == 0 or X_pert.shape[0] == 0:
        raise EpiflowError(f"held-out type {ctx['holdout']!r} has {X_ctrl.shape[0]} control and {X_pert.shape[0]} "
                           "perturbed cells; both are needed", field="holdout")
    pred = np.asarray(out.predicted, np.float64)
    if pred.ndim != 2 or pred.shape[1] != X_ctrl.shape[1]:
        raise EpiflowError(f"{method} predicted a {pred.shape} matrix for {X_ctrl.shape[1]} features", field="predicted")
    real_ctrl = np.asarray(X_ctrl.mean(0), np.float64).ravel()
    m = pred.mean(0)
    p = {"mean": m, "change": m - real_ctrl}
    if pred.shape[0] == X_ctrl.shape[0]:
        p["cells"] = pred
    else:
        log.warning("%s predicted %d cells for %d control cells of %s: no Wasserstein distance or UMAP", method,
                    pred.shape[0], X_ctrl.shape[0], ctx["holdout"])
    values, frame, info = evaluate_group(X_ctrl=X_ctrl, X_pert=X_pert, predicted={method: p}, task=STIM_TASK,
                                         ks=list(ks or DEFAULT_KS), n_top=n_top, seed=seed, max_ot_cells=max_ot_cells,
                                         tie_correct=tie_correct)
    values[method].update(n_cells_control=info["n_ctrl"], n_cells_perturbed=info["n_pert"],
                          n_top_used=info["n_top_used"], runtime_s=float(out.info.get("runtime_s", np.nan)))
    return values, {method: p}, frame


def leave_one_type_out(tool: str, adata, *, holdouts, method: str, dataset: str, params: dict | None = None,
                       canonical: dict | None = None, run: dict | None = None, ks=None, n_top: int = 1000,
                       tie_correct: bool = False,
                       seed: int = 0, umap_groups=None, max_umap_cells: int = 1000):
    """The stimulation benchmark of EpiAgent's ``predict-stimulation`` for a baseline tool: for each
    cell type of ``holdouts`` in turn (:func:`stimulation_types`), its perturbed cells are removed, the
    tool is fitted on the rest (:func:`canonical_input` with ``canonical``, :func:`run_baseline` with
    ``run``) and predicts them from the type's control cells.

    Returns (metric rows: ``metric[type]`` per held-out type and, without the suffix, their means,
    plus ``n_features``, ``n_heldout_types`` and ``runtime_total_s``; one :class:`BaselineOutput` with
    every type's predicted cells, ``groups`` naming the type of each row; the Fig. 3g UMAP table of
    :func:`epiflow.tasks.perturbation.stimulation_umaps` (columns ``STIM_CELLS_COLUMNS``) of the types
    of ``umap_groups``, default all; ``[]``: none)."""
    from ..tasks.perturbation import STIM_CELLS_COLUMNS, STIM_TASK, _summary_rows, stimulation_umaps

    holdouts = list(holdouts)
    if not holdouts:
        raise EpiflowError("no held-out cell type", field="holdout")
    per_group, preds, groups, infos, umaps, features = {}, [], [], {}, [], None
    total = 0.0
    for t in holdouts:
        inp, ctx = canonical_input(adata, "perturbation", holdout=t, seed=seed, **(canonical or {}))
        log.info("%s, held-out %s: fitting on %d cells x %d features", method, t, inp.n_obs, inp.n_vars)
        out = run_baseline(tool, inp, "perturbation", params, **(run or {}))
        values, predicted, frame = stimulation_group(out, ctx, method=method, ks=ks, n_top=n_top, seed=seed,
                                                     tie_correct=tie_correct)
        per_group[t] = values
        total += float(out.info.get("runtime_s", 0.0))
        infos[t] = out.info
        features = ctx["features"]
        preds.append(np.asarray(out.predicted, np.float32))
        groups += [t] * len(out.predicted)
        if umap_groups is None or t in umap_groups:
            umaps.append(stimulation_umaps(binarize(ctx["real_ctrl"]), binarize(ctx["real_pert"]), predicted,
                                           np.flatnonzero(frame["top_da"].to_numpy()), group=t,
                                           ctrl_names=ctx["ctrl_names"], pert_names=ctx["pert_names"], seed=seed,
                                           max_cells=max_umap_cells))
    extra = {method: {"n_features": len(features), "n_heldout_types": len(holdouts), "runtime_total_s": total}}
    rows = _summary_rows(STIM_TASK, dataset, per_group, extra)
    combined = BaselineOutput(predicted=np.concatenate(preds), features=features, groups=np.asarray(groups, str),
                              info={"holdouts": holdouts, "per_holdout": infos, "runtime_s": total,
                                    "env_mode": next(iter(infos.values())).get("env_mode")})
    umaps = [u for u in umaps if len(u)]
    cells = pd.concat(umaps, ignore_index=True) if umaps else pd.DataFrame(columns=STIM_CELLS_COLUMNS)
    return rows, combined, cells
