"""Perturbation prediction (SPEC §5): stimulated (out-of-sample) and unseen genetic perturbations.

Stimulated perturbation, :func:`run_stimulation`
------------------------------------------------
Cells carry a condition label (obs ``condition_key``): the unperturbed ``control`` label or a
stimulation. Leave-one-cell-type-out: for every held-out cell type T,

1. zero-shot embeddings of all cells (the pretrained model) -> per cell type, exact OT (POT ``ot.emd``,
   cosine cost, uniform weights) matches every perturbed cell to an unperturbed cell of its type;
2. the model gets a learnable [PER] token added at position 0 and is fine-tuned on
   * every unperturbed cell (no token, reconstructs itself; classifier label 0),
   * every perturbed cell of the other types (WITH [PER], reconstructs itself; label 1),
   * for every perturbed cell of the other types, its matched unperturbed partner duplicated WITH
     [PER], trained to reproduce the perturbed cell (CCA + SR targets of the perturbed partner; label 1),
   with the auxiliary "unperturbed vs perturbed + predicted" classifier weighted 0.01. [PER] thus
   means "decode the perturbed state": without it the model only ever reconstructs unperturbed cells.
   (Perturbed cells reconstructing themselves WITHOUT the token - ``perturbed_self_token=False`` -
   make the token-free path hedge between the two states, which shrinks the change the token carries);
3. the unperturbed cells of T are encoded with [PER] and decoded with the signal decoder (calibrated
   sigmoid probabilities) -> predicted perturbed cells of T.

Genetic perturbation, :func:`run_genetic`
-----------------------------------------
Cells carry a perturbation label (obs ``perturbation_key``: ``control`` or gene symbol(s) joined by
``+``). One learnable token per gene, passed through the GNN (one SGConv, LayerNorm) over the GEARS
gene graph (:mod:`epiflow.genome.gene_graph`), is the conditional token. ``holdout_fraction`` (25 %)
of the perturbations are held out (seeded); the others train as in 2. above (control partner + gene
token -> perturbed cell; controls reconstruct themselves without a token), except that the perturbed
cells reconstruct themselves WITHOUT their gene token by default (``perturbed_self_token=True``: with
it, as the stimulation task); held-out perturbations are predicted from all controls + their gene
token.

Evaluation (:mod:`epiflow.metrics.perturbation`)
-----------------------------------------------
Per held-out group: DA cCREs by Wilcoxon (scanpy ``rank_genes_groups``) between the real unperturbed
and perturbed cells of the group; mean accessibility = fraction of cells with the cCRE open (real
cells) or mean decoder probability (predicted cells). Methods side by side:

* ``EpiAgent`` - decoded predicted cells (mean of probabilities);
* ``EpiAgent_delta`` - real unperturbed mean + the model's own change (decoded with [PER] minus
  decoded without it): separates "learned the change" from "decoder calibration";
* ``no_change`` - the unperturbed cells themselves (change 0: direction accuracy 0.5 by the tie rule);
* ``mean_shift`` - unperturbed cells + the mean change learned on the other cell types (stimulation)
  or the other (training) perturbations (genetic), clipped to [0, 1].

Stimulation metrics: ``R2_all`` / ``R2_top{n}`` (R^2 of the linear regression of predicted on real mean
accessibility over all / the top-n DA cCREs), ``dir_acc_up@k``, ``dir_acc_down@k``, ``dir_acc@k``
(k in 100, 250, 500, 1000; capped at the cCREs with that sign - ``k_used_up@k`` / ``k_used_down@k``
say how many), ``wasserstein_top{n}`` (exact OT, Euclidean cost, between the real perturbed cells and
the predicted cells over the top-n DA cCREs; predicted probabilities are sampled once as Bernoulli
draws (seeded) so that both sides are 0/1 cells). Genetic: ``pearson_top{n}`` (of mean accessibility),
``pearson_delta_top{n}`` (of the change from the controls), direction accuracies. Rows with a
``[group]`` suffix are per held-out group; rows without it are the means over groups.

Both return a :class:`~epiflow.tasks.common.TaskResult` and write nothing; the verbs
(:mod:`epiflow.tasks.perturbation_cli`) write it: ``metrics.tsv`` (long format ``task, dataset,
method, metric, value``), ``mean_accessibility.tsv.gz`` (``data['mean_accessibility']``: per group and
cCRE, real control / perturbed means, DA score, each method's prediction), ``predicted_cells.h5ad``
(EpiAgent's predicted cells, decoder probabilities, obs = source cell and group; not with
``save_cells=False``), ``finetune_loss.tsv``, ``split.tsv`` (genetic) and the figures of
:mod:`epiflow.plots.perturbation` (``scatter.png``: real vs predicted mean accessibility, top-n DA
cCREs highlighted; ``direction.png``: direction accuracy by k, methods side by side).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..corpus.shard import Shard
from ..errors import InputFormatError
from ..metrics.perturbation import (
    DEFAULT_KS,
    cap_k,
    differential_accessibility,
    direction_accuracy,
    pearson,
    r2_linear,
    top_da,
    wasserstein,
)
from ..metrics.table import dataset_label, metric_rows, metrics_frame
from .common import TaskResult
from .config import GeneticConfig, StimulationConfig
from .perturbation_train import (
    _missing,
    check_base_model,
    decode,
    finetune_conditioned,
    labelled_cells,
    ot_match,
    ot_match_groups,
    zero_shot_embeddings,
)

log = logging.getLogger(__name__)

STIM_TASK = "stimulated_perturbation"
GENE_TASK = "genetic_perturbation"
METHODS = ("EpiAgent", "EpiAgent_delta", "no_change", "mean_shift")


# ----------------------------------------------------------------------------- evaluation core
def _mean(X) -> np.ndarray:
    return np.asarray(X.mean(0), dtype=np.float64).ravel()


def _sample_cells(P: np.ndarray, rng) -> np.ndarray:
    return (rng.random(P.shape) < P).astype(np.float32)


def evaluate_group(*, X_ctrl, X_pert, predicted: dict, task: str, ks=DEFAULT_KS, n_top: int = 1000,
                   seed: int = 0, max_ot_cells: int = 2000, tie_correct: bool = False):
    """Metrics of every method for one held-out group.

    ``X_ctrl`` / ``X_pert``: real unperturbed / perturbed cells (0/1, cells x cCREs, sparse ok).
    ``predicted``: method -> dict(mean=[N] predicted mean accessibility, change=[N] predicted change,
    cells=optional [n, N] predicted cells as probabilities in [0, 1]); ``tie_correct``: of the DA test
    (:func:`epiflow.metrics.perturbation.differential_accessibility`). Returns (values per method,
    per-cCRE frame, info)."""
    n = X_ctrl.shape[1]
    scores = differential_accessibility(X_ctrl, X_pert, tie_correct=tie_correct)
    real_ctrl, real_pert = _mean(X_ctrl), _mean(X_pert)
    n_top_used = cap_k(n_top, n, "cCREs")
    top = top_da(scores, n_top_used)["all"]
    rng = np.random.default_rng(seed)
    values: dict[str, dict] = {}
    n_up_avail, n_dn_avail = int((scores > 0).sum()), int((scores < 0).sum())
    for method, pred in predicted.items():
        v: dict[str, float] = {}
        m, ch = np.asarray(pred["mean"], np.float64), np.asarray(pred["change"], np.float64)
        if task == STIM_TASK:
            v["R2_all"] = r2_linear(real_pert, m)
            v[f"R2_top{n_top}"] = r2_linear(real_pert[top], m[top])
        else:
            v[f"pearson_top{n_top}"] = pearson(real_pert[top], m[top])
            v[f"pearson_delta_top{n_top}"] = pearson((real_pert - real_ctrl)[top], ch[top])
        for k in ks:
            sets = top_da(scores, k)
            acc = direction_accuracy(ch, sets["up"], sets["down"])
            v[f"dir_acc_up@{k}"] = acc["up"]
            v[f"dir_acc_down@{k}"] = acc["down"]
            v[f"dir_acc@{k}"] = acc["all"]
            v[f"k_used_up@{k}"] = len(sets["up"])
            v[f"k_used_down@{k}"] = len(sets["down"])
        if task == STIM_TASK and pred.get("cells") is not None:
            cells = np.asarray(pred["cells"][:, top], dtype=np.float64)
            is_binary = np.isin(cells, (0.0, 1.0)).all()
            sample = cells if is_binary else _sample_cells(cells, rng)
            real = X_pert[:, top]
            real = real.toarray() if hasattr(real, "toarray") else np.asarray(real)
            v[f"wasserstein_top{n_top}"] = wasserstein(real, sample, max_cells=max_ot_cells, seed=seed)
        values[method] = v
    for k in ks:
        if k > n_up_avail or k > n_dn_avail:
            log.warning("top-%d DA: only %d up and %d down cCREs have that sign; the direction accuracy "
                        "uses those (k_used_up / k_used_down in metrics.tsv)", k, n_up_avail, n_dn_avail)
    frame = pd.DataFrame({"ccre": np.arange(n), "da_score": scores, "real_control": real_ctrl,
                          "real_perturbed": real_pert, "top_da": np.isin(np.arange(n), top)})
    for method, pred in predicted.items():
        frame[f"pred_{method}"] = np.asarray(pred["mean"], np.float64)
    info = {"n_top_used": n_top_used, "n_ctrl": X_ctrl.shape[0], "n_pert": X_pert.shape[0]}
    return values, frame, info


STIM_CELLS_COLUMNS = ["group", "method", "kind", "cell", "umap1", "umap2"]


def stimulation_umaps(X_ctrl, X_pert, predicted: dict, top, *, group: str, ctrl_names=None, pert_names=None,
                      seed: int = 0, max_cells: int = 1000, n_pcs: int = 30) -> pd.DataFrame:
    """Fig. 3g: for each method of ``predicted`` (as in :func:`evaluate_group`; its ``cells`` rows are
    the rows of ``X_ctrl``), one UMAP of the group's unperturbed, perturbed and predicted cells.

    The cells are compared where the metrics compare them: over the ``top`` DA cCREs, the predicted
    probabilities drawn once as 0/1 cells (seeded, as for the Wasserstein distance; predictions that
    are already 0/1, e.g. ``no_change``, are kept), so that real and predicted cells are on one
    scale. A PCA (``n_pcs`` components) is fitted on the real cells only, the predicted cells are
    projected into it, and each method's three sets get their own UMAP
    (:func:`epiflow.tasks.common.umap_coords`). Each set is capped at ``max_cells`` random cells (the
    same unperturbed cells are the sources of the predicted ones). Returns :data:`STIM_CELLS_COLUMNS`
    (``kind``: unperturbed / perturbed / predicted; ``cell``: the cell's name, for a predicted cell
    its source cell's)."""
    from sklearn.decomposition import PCA

    from .common import umap_coords

    methods = [m for m, p in predicted.items() if p.get("cells") is not None]
    top = np.asarray(top, dtype=np.int64)
    if not methods or len(top) == 0:
        return pd.DataFrame(columns=STIM_CELLS_COLUMNS)
    rng = np.random.default_rng(seed)

    def pick(n):
        return np.sort(rng.choice(n, max_cells, replace=False)) if n > max_cells else np.arange(n)

    ic, ip = pick(X_ctrl.shape[0]), pick(X_pert.shape[0])

    def dense(X, rows):
        part = X[rows][:, top]
        return np.asarray(part.toarray() if hasattr(part, "toarray") else part, dtype=np.float32)

    ctrl, pert = dense(X_ctrl, ic), dense(X_pert, ip)
    real = np.concatenate([ctrl, pert])
    k = int(min(n_pcs, real.shape[1], real.shape[0] - 1))
    if k < 2:
        return pd.DataFrame(columns=STIM_CELLS_COLUMNS)
    pca = PCA(n_components=k, random_state=seed).fit(real)
    z_ctrl, z_pert = pca.transform(ctrl), pca.transform(pert)
    cn = np.asarray(ctrl_names if ctrl_names is not None else np.arange(X_ctrl.shape[0])).astype(str)[ic]
    pn = np.asarray(pert_names if pert_names is not None else np.arange(X_pert.shape[0])).astype(str)[ip]
    kinds = np.repeat(["unperturbed", "perturbed", "predicted"], [len(ic), len(ip), len(ic)])
    names = np.concatenate([cn, pn, cn])
    parts = []
    for m in methods:
        cells = np.asarray(predicted[m]["cells"][ic][:, top], dtype=np.float64)
        if not np.isin(cells, (0.0, 1.0)).all():
            cells = _sample_cells(cells, rng)
        xy = umap_coords(np.concatenate([z_ctrl, z_pert, pca.transform(cells.astype(np.float32))]), seed=seed)
        parts.append(pd.DataFrame({"group": group, "method": m, "kind": kinds, "cell": names,
                                   "umap1": xy[:, 0], "umap2": xy[:, 1]}))
    return pd.concat(parts, ignore_index=True)


class _FromControls:
    """Predicted cells that are a function of the real unperturbed cells ``X`` (sparse), made dense only
    where read: ``cells[:, cols]`` and ``cells[rows][:, cols]`` (what :func:`evaluate_group` and
    :func:`stimulation_umaps` read: the top DA cCREs) give ``f(X.toarray())`` at those places, without
    the dense cells x cCREs matrix."""

    def __init__(self, X, add=None, clip: bool = False):
        self.X, self.add, self.clip = X, add, clip

    @property
    def shape(self):
        return self.X.shape

    def __getitem__(self, key):
        if not isinstance(key, tuple):  # rows
            return _FromControls(self.X[key], self.add, self.clip)
        rows, cols = key
        X = self.X if isinstance(rows, slice) and rows == slice(None) else self.X[rows]
        out = X[:, cols].toarray()
        if self.add is not None:
            out = out + np.asarray(self.add)[cols][None, :]
        return np.clip(out, 0, 1) if self.clip else out


_MEAN_BLOCK = 1 << 21  # float64 elements of one block of _clipped_mean (16 MiB)


def _clipped_mean(X, add) -> np.ndarray:
    """``np.clip(X.toarray() + add, 0, 1).mean(0)`` (float64, ``add`` float64) a block of columns at a
    time: each column's sum runs down the cells in the same order, so the values are the same."""
    n, m = X.shape
    Xc = sp.csc_matrix(X)
    out = np.empty(m)
    step = max(2, _MEAN_BLOCK // max(n, 1))  # >= 2 columns: numpy sums a lone column pairwise
    bounds = list(range(0, m, step)) + [m]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:
        del bounds[-2]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[lo:hi] = np.clip(Xc[:, lo:hi].toarray(order="C") + add[None, lo:hi], 0.0, 1.0).mean(0)
    return out


def stimulation_predictions(X_ctrl, P_per: np.ndarray, ctrl_mean: np.ndarray, shift: np.ndarray) -> dict:
    """The ``predicted`` methods of one held-out group (:func:`evaluate_group`): ``EpiAgent`` (the decoded
    cells ``P_per`` with [PER]), ``EpiAgent_delta`` (real unperturbed cells + the model's change
    ``P_per.mean(0) - ctrl_mean``), ``no_change`` (the real unperturbed cells) and ``mean_shift`` (real
    unperturbed cells + the mean change of the other types, ``shift``), clipped to [0, 1]. The cells of
    the last three are built from ``X_ctrl`` only where they are read (:class:`_FromControls`)."""
    real_ctrl = _mean(X_ctrl)
    model_change = P_per.mean(0) - ctrl_mean
    ms_mean = _clipped_mean(X_ctrl, np.asarray(shift, dtype=np.float64))
    return {
        "EpiAgent": {"mean": P_per.mean(0), "change": model_change, "cells": P_per},
        "EpiAgent_delta": {"mean": np.clip(real_ctrl + model_change, 0, 1), "change": model_change,
                           "cells": _FromControls(X_ctrl, model_change, clip=True)},
        "no_change": {"mean": real_ctrl, "change": np.zeros_like(real_ctrl), "cells": _FromControls(X_ctrl)},
        "mean_shift": {"mean": ms_mean, "change": ms_mean - real_ctrl, "cells": _FromControls(X_ctrl, shift, True)},
    }


# ----------------------------------------------------------------------------- result
def mean_accessibility(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The per-group, per-cCRE frames of :func:`evaluate_group` as one table (``group`` first)."""
    big = pd.concat([f.assign(group=g) for g, f in frames.items()], ignore_index=True)
    return big[["group"] + [c for c in big.columns if c != "group"]]


def _result(rows, frames: dict, cells_parts, history, *, tables: dict | None = None) -> TaskResult:
    import anndata as ad

    result = TaskResult(metrics=metrics_frame(rows), tables=dict(tables or {}), data={"frames": frames})
    if frames:
        result.data["mean_accessibility"] = mean_accessibility(frames)
    if cells_parts:
        X = np.concatenate([c[0] for c in cells_parts]).astype(np.float32)
        obs = pd.concat([c[1] for c in cells_parts], ignore_index=True)
        obs.index = [f"pred{i}" for i in range(len(obs))]
        a = ad.AnnData(X=X, obs=obs.astype(str))
        a.uns["note"] = "EpiAgent-predicted perturbed cells: calibrated signal-decoder probabilities"
        result.h5ad["predicted_cells"] = a
    if history:
        result.tables["finetune_loss"] = pd.DataFrame(history)
    return result


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _summary_rows(task, dataset, per_group: dict[str, dict[str, dict]], extra: dict | None = None):
    rows = []
    methods = list(dict.fromkeys(m for g in per_group.values() for m in g))
    for m in methods:
        keys = list(dict.fromkeys(k for g in per_group.values() for k in g.get(m, {})))
        means = {k: _nanmean([g[m][k] for g in per_group.values() if m in g and k in g[m]]) for k in keys}
        rows += metric_rows(task, dataset, m, means)
        for gname, g in per_group.items():
            rows += metric_rows(task, dataset, m, {f"{k}[{gname}]": v for k, v in g.get(m, {}).items()})
    for m, vals in (extra or {}).items():
        rows += metric_rows(task, dataset, m, vals)
    return rows


# ----------------------------------------------------------------------------- stimulation
def run_stimulation(cells: Shard, base_model, settings: StimulationConfig | None = None, *,
                    dataset: str | None = None, max_ot_cells: int = 2000, max_umap_cells: int = 1000,
                    perturbed_self_token: bool = True) -> TaskResult:
    """Leave-one-cell-type-out stimulation prediction of ``cells`` (those whose condition is set) with
    ``base_model`` (a pretrained EpiAgent with signal decoder and CCA head, not modified).

    Returns the metrics, ``tables['finetune_loss']``, ``tables['cells']`` (``umap``: the UMAPs of
    :func:`stimulation_umaps` of every held-out type, or of ``focus_group`` alone; at most
    ``max_umap_cells`` cells per set), ``h5ad['predicted_cells']`` (``save_cells``) and
    ``data['frames']`` / ``data['mean_accessibility']`` (per group and cCRE). ``dataset``: the metrics'
    dataset column (default :func:`dataset_label`). ``max_ot_cells``: the largest side of the
    Wasserstein OT problem. ``perturbed_self_token``: the perturbed training cells reconstruct
    themselves with [PER] (default) or without it (the previous behaviour, for comparison)."""
    cfg = settings or StimulationConfig()
    condition_key, cell_type_key, control = cfg.condition_key, cfg.label_key, cfg.control
    holdout, min_cells, ks, n_top, seed = cfg.holdout, cfg.min_cells, list(cfg.k), cfg.n_top, cfg.seed
    check_base_model(base_model)
    cells = labelled_cells(cells, condition_key)
    dataset = dataset_label(cells, dataset, default="data")
    for key in (condition_key, cell_type_key):
        if key not in cells.obs:
            raise InputFormatError(f"obs has no column {key!r}", field=key,
                                   fix="pass --condition-key / --cell-type-key naming existing obs columns")
    cond = cells.obs[condition_key].astype(str).to_numpy()
    ctype = cells.obs[cell_type_key].astype(str).to_numpy()
    keep = ~_missing(cells.obs[cell_type_key])
    is_ctrl = cond == control
    if not is_ctrl.any():
        raise InputFormatError(f"no cell has {condition_key} == {control!r} (values: "
                               f"{sorted(set(cond))[:10]})", field=condition_key,
                               fix="pass --control with the label of the unperturbed cells")
    stim_labels = sorted(set(cond[~is_ctrl]))
    if len(stim_labels) > 1:
        log.warning("several perturbed conditions %s: all are treated as one [PER] condition", stim_labels)
    types = [t for t in sorted(set(ctype[keep]))
             if (keep & is_ctrl & (ctype == t)).sum() >= min_cells and (keep & ~is_ctrl & (ctype == t)).sum() >= min_cells]
    if holdout:
        unknown = [h for h in holdout if h not in types]
        if unknown:
            raise InputFormatError(f"held-out cell type(s) {unknown} lack >= {min_cells} unperturbed and perturbed "
                                   f"cells (usable: {types})", field="holdout")
        hold = list(holdout)
    else:
        hold = types
    focus = cfg.focus_group
    if focus is not None and focus not in hold:
        raise InputFormatError(f"focus_group {focus!r} is not a held-out cell type (held out: {hold})",
                               field="focus_group", fix="name one of the held-out types, or leave it unset")
    if len(types) < 2:
        raise InputFormatError(f"leave-one-cell-type-out needs >= 2 cell types with >= {min_cells} unperturbed and "
                               f"perturbed cells each; usable: {types}", field=cell_type_key)
    log.info("stimulation: %d cells, %d cell types, holding out %s", cells.n_cells, len(types), hold)
    emb = zero_shot_embeddings(base_model, cells, device=cfg.device)
    all_ctrl = np.flatnonzero(keep & is_ctrl)
    all_pert = np.flatnonzero(keep & ~is_ctrl)
    partners = ot_match_groups(emb, all_ctrl, all_pert, ctype)
    Xb = cells.binary()
    names = cells.obs["cell_id"].astype(str).to_numpy() if "cell_id" in cells.obs else \
        np.asarray(cells.obs.index, dtype=str)
    per_group, frames, cells_parts, history, umaps = {}, {}, [], [], []
    for T in hold:
        train_pert = all_pert[(ctype[all_pert] != T) & np.isin(ctype[all_pert], types)]
        train_partner = partners[np.searchsorted(all_pert, train_pert)]
        ok = train_partner >= 0
        ex = pd.concat([
            pd.DataFrame({"input": all_ctrl, "target": all_ctrl, "cond": -1, "label": 0}),
            pd.DataFrame({"input": train_pert, "target": train_pert, "cond": 0 if perturbed_self_token else -1,
                          "label": 1}),
            pd.DataFrame({"input": train_partner[ok], "target": train_pert[ok], "cond": 0, "label": 1}),
        ], ignore_index=True)
        from ..model import derive

        model = derive(base_model, conditions=1, seed=cfg.seed)
        log.info("held-out %s: fine-tuning on %d examples (%d [PER] pairs)", T, len(ex), int(ok.sum()))
        model, _, hist = finetune_conditioned(model, cells, ex, mode="condition", settings=cfg)
        history += [dict(h, holdout=T) for h in hist]
        q_ctrl = all_ctrl[ctype[all_ctrl] == T]
        q_pert = all_pert[ctype[all_pert] == T]
        P_per = decode(model, cells, q_ctrl, mode="condition", cond=0)
        ctrl_mean = decode(model, cells, q_ctrl, mode="condition", cond=-1).mean(0)  # only its mean is kept
        X_ctrl, X_pert = Xb[q_ctrl], Xb[q_pert]
        others = [t for t in types if t != T]
        shift = np.mean([_mean(Xb[all_pert[ctype[all_pert] == t]]) - _mean(Xb[all_ctrl[ctype[all_ctrl] == t]])
                         for t in others], axis=0)
        predicted = stimulation_predictions(X_ctrl, P_per, ctrl_mean, shift)
        values, frame, info = evaluate_group(X_ctrl=X_ctrl, X_pert=X_pert, predicted=predicted, task=STIM_TASK,
                                             ks=ks, n_top=n_top, seed=seed, max_ot_cells=max_ot_cells,
                                             tie_correct=cfg.da_tie_correct)
        for m in values:
            values[m].update(n_cells_control=info["n_ctrl"], n_cells_perturbed=info["n_pert"],
                             n_top_used=info["n_top_used"])
        values["EpiAgent"]["per_token_norm"] = float(model.condition_embedding.weight.detach().norm())
        values["EpiAgent"]["finetune_steps"] = len(hist)
        values["EpiAgent"]["finetune_final_loss"] = hist[-1]["loss"] if hist else float("nan")
        per_group[T] = values
        frames[T] = frame
        if cfg.umap and focus in (None, T):
            umaps.append(stimulation_umaps(X_ctrl, X_pert, predicted, np.flatnonzero(frame["top_da"].to_numpy()),
                                           group=T, ctrl_names=names[q_ctrl], pert_names=names[q_pert], seed=seed,
                                           max_cells=max_umap_cells))
        if cfg.save_cells:
            cells_parts.append((P_per, pd.DataFrame({"source_cell": names[q_ctrl], "group": T})))
        del model, P_per, predicted  # before the next group's are decoded (save_cells keeps its own reference)
    rows = _summary_rows(STIM_TASK, dataset, per_group)
    tables = {"cells": pd.concat(umaps, ignore_index=True)} if cfg.umap else None
    return _result(rows, frames, cells_parts, history, tables=tables)


# ----------------------------------------------------------------------------- genetic
def split_genes(label: str) -> list[str]:
    return [g.strip() for g in str(label).replace(",", "+").split("+") if g.strip()]


def holdout_split(perturbations, fraction: float = 0.25, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) perturbations: ``round(fraction * n)`` (at least 1, at most n - 1) held out, seeded."""
    perts = sorted(set(perturbations))
    if len(perts) < 2:
        raise InputFormatError(f"need >= 2 perturbations to hold some out, got {perts}", field="perturbation")
    n_hold = int(min(max(1, round(fraction * len(perts))), len(perts) - 1))
    rng = np.random.default_rng(seed)
    held = sorted(rng.choice(perts, n_hold, replace=False).tolist())
    return [p for p in perts if p not in held], held


def run_genetic(cells: Shard, base_model, gene_graph, settings: GeneticConfig | None = None, *,
                dataset: str | None = None, perturbed_self_token: bool = False) -> TaskResult:
    """Unseen genetic perturbation prediction of ``cells`` (those whose perturbation is set) with the
    gene GNN token over ``gene_graph`` (:class:`epiflow.genome.gene_graph.GeneGraph`), fine-tuning a
    copy of ``base_model``.

    Returns the metrics, ``tables['split']`` (perturbation, split = train / heldout),
    ``tables['finetune_loss']``, ``h5ad['predicted_cells']`` (``save_cells``) and ``data['frames']`` /
    ``data['mean_accessibility']``. ``dataset``: the metrics' dataset column (default
    :func:`dataset_label`). ``perturbed_self_token``: the perturbed training cells reconstruct themselves
    with their gene token (as the stimulation task's do with [PER]) instead of without a token (the
    default here: the genetic task was not re-tuned when stimulation changed; docs/results_notes.md)."""
    from ..genome.gene_graph import GeneGraph
    from ..model import derive

    cfg = settings or GeneticConfig()
    perturbation_key, control, holdout = cfg.perturbation_key, cfg.control, cfg.holdout
    min_cells, ks, n_top, seed = cfg.min_cells, list(cfg.k), cfg.n_top, cfg.seed
    check_base_model(base_model)
    cells = labelled_cells(cells, perturbation_key)
    dataset = dataset_label(cells, dataset, default="data")
    lab = cells.obs[perturbation_key].astype(str).to_numpy()
    is_ctrl = lab == control
    if is_ctrl.sum() < min_cells:
        raise InputFormatError(f"{int(is_ctrl.sum())} cells have {perturbation_key} == {control!r}; need >= "
                               f"{min_cells}", field=perturbation_key, fix="pass --control with the control label")
    counts = pd.Series(lab[~is_ctrl]).value_counts()
    perts = sorted(counts[counts >= min_cells].index)
    if len(counts) > len(perts):
        log.warning("%d perturbations with < %d cells are ignored", len(counts) - len(perts), min_cells)
    # gene graph nodes: the graph's genes + perturbed genes it lacks (isolated)
    pert_genes = sorted({g for p in perts for g in split_genes(p)})
    missing = [g for g in pert_genes if g not in set(gene_graph.genes)]
    if missing:
        log.warning("%d perturbed genes have no GO annotation (isolated in the gene graph): %s", len(missing),
                    missing[:10])
        gene_graph = GeneGraph(list(gene_graph.genes) + missing, gene_graph.edge_index, gene_graph.edge_weight)
    gidx = gene_graph.index()
    if holdout:
        bad = [h for h in holdout if h not in perts]
        if bad:
            raise InputFormatError(f"held-out perturbation(s) {bad} are not among {perts[:20]}", field="holdout")
        held = sorted(holdout)
        train = [p for p in perts if p not in held]
    else:
        train, held = holdout_split(perts, cfg.holdout_fraction, seed)
    log.info("genetic: %d controls, %d perturbations (%d train, %d held out: %s); gene graph %d genes, %d edges",
             int(is_ctrl.sum()), len(perts), len(train), len(held), held, gene_graph.n_genes, gene_graph.n_edges)
    max_genes = max(len(split_genes(p)) for p in perts)

    def gene_ids(p):
        g = [gidx[x] for x in split_genes(p)]
        return g + [-1] * (max_genes - len(g))

    emb = zero_shot_embeddings(base_model, cells, device=cfg.device)
    ctrl = np.flatnonzero(is_ctrl)
    train_cells = np.flatnonzero(np.isin(lab, train))
    partners = np.empty(len(train_cells), dtype=np.int64)
    for p in train:  # per perturbation: exact OT of the controls onto that perturbation's cells
        sel = np.flatnonzero(lab[train_cells] == p)
        partner, _ = ot_match(emb[ctrl], emb[train_cells[sel]])
        partners[sel] = ctrl[partner]
    # examples: cond holds a row into the gene-id table below
    table = np.asarray([gene_ids(p) for p in perts] + [[-1] * max_genes], dtype=np.int64)
    pidx = {p: i for i, p in enumerate(perts)}
    none = len(perts)
    ex = pd.concat([
        pd.DataFrame({"input": ctrl, "target": ctrl, "cond": none, "label": 0}),
        pd.DataFrame({"input": train_cells, "target": train_cells,
                      "cond": [pidx[p] for p in lab[train_cells]] if perturbed_self_token else none, "label": 1}),
        pd.DataFrame({"input": partners, "target": train_cells, "cond": [pidx[p] for p in lab[train_cells]],
                      "label": 1}),
    ], ignore_index=True)
    model = derive(base_model, gene_graph=gene_graph, seed=cfg.seed)
    model = _GeneTableModel(model, table)
    model, _, history = finetune_conditioned(model, cells, ex, mode="condition", settings=cfg)
    Xb = cells.binary()
    X_ctrl = Xb[ctrl]
    real_ctrl = _mean(X_ctrl)
    train_shift = np.mean([_mean(Xb[lab == p]) - real_ctrl for p in train], axis=0)
    none_mean = decode(model, cells, ctrl, mode="condition", cond=none).mean(0)  # only its mean is kept
    per_group, frames, cells_parts = {}, {}, []
    for p in held:
        P = decode(model, cells, ctrl, mode="condition", cond=pidx[p])
        change = P.mean(0) - none_mean
        predicted = {
            "EpiAgent": {"mean": P.mean(0), "change": change},
            "EpiAgent_delta": {"mean": np.clip(real_ctrl + change, 0, 1), "change": change},
            "no_change": {"mean": real_ctrl, "change": np.zeros_like(real_ctrl)},
            "mean_shift": {"mean": np.clip(real_ctrl + train_shift, 0, 1), "change": train_shift},
        }
        values, frame, info = evaluate_group(X_ctrl=X_ctrl, X_pert=Xb[lab == p], predicted=predicted, task=GENE_TASK,
                                             ks=ks, n_top=n_top, seed=seed, tie_correct=cfg.da_tie_correct)
        for m in values:
            values[m].update(n_cells_perturbed=info["n_pert"], n_top_used=info["n_top_used"])
        per_group[p] = values
        frames[p] = frame
        if cfg.save_cells:
            cells_parts.append((P, pd.DataFrame({"source_cell": ctrl.astype(str), "group": p})))
        del P  # before the next perturbation's cells are decoded
    extra = {"EpiAgent": {"finetune_steps": len(history),
                          "finetune_final_loss": history[-1]["loss"] if history else float("nan"),
                          "n_train_perturbations": len(train), "n_heldout_perturbations": len(held),
                          "gene_graph_edges": gene_graph.n_edges}}
    rows = _summary_rows(GENE_TASK, dataset, per_group, extra)
    split = pd.DataFrame({"perturbation": train + held, "split": ["train"] * len(train) + ["heldout"] * len(held)})
    return _result(rows, frames, cells_parts, history, tables={"split": split})


class _GeneTableModel:
    """Wraps an EpiAgent with a perturbation GNN so that ``condition_ids`` index a table of gene-id rows
    (one per perturbation, last row = no gene): the training / decoding helpers stay generic."""

    def __init__(self, model, table: np.ndarray):
        import torch

        self.model = model
        self.table = torch.from_numpy(table)

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, ids, condition_ids=None, **kw):
        if condition_ids is not None:
            genes = self.table.to(condition_ids.device)[condition_ids.long()]
            return self.model(ids, perturbation=genes, **kw)
        return self.model(ids, **kw)

    def to(self, *a, **k):
        self.model.to(*a, **k)
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        self.model.eval()
        return self
