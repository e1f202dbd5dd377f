"""Reference integration (batch correction) and query mapping (SPEC §5, batch integration).

Method (EpiAgent, batch-conditioned fine-tuning):

1. **Zero-shot embeddings** of all reference cells with the pretrained model (no batch token).
2. **OT matching across each pair of batches**: for batches A and B, exact earth mover's distance
   (POT ``ot.emd``, uniform weights) on the cosine distance of the zero-shot embeddings; each cell of A
   is matched to the cell of B that receives most of its mass, and vice versa. Batches larger than
   ``max_ot_cells`` are matched in random chunks of that size.
3. **Filtering**: a 2-component Gaussian mixture on the matched distances of each batch pair; the
   matches in the component with the lower mean are kept (close, trustworthy partners).
4. **Fine-tuning with a batch token** (``batch_embedding`` added at position 0; the authors'
   batch-conditioned layout: the base keys plus ``batch_embedding.weight``, zero-initialised by
   :func:`epiflow.model.derive`): signal reconstruction
   (BCE, pos_weight 100) and cell-cCRE alignment (K = 1) whose *targets* are the cCREs accessible in the
   cell **or in its kept partners** (union), so batch-specific signal is left to the batch token.
5. **Embeddings with and without the batch token**; the zero-shot and an LSI baseline beside them.

Metrics (long table, task ``integration``): NMI / ARI of Leiden bisected to the number of cell types,
cell-type ASW, iLISI, kBET (global and per label), graph connectivity and batch ASW
(:mod:`epiflow.metrics.integration`, scIB definitions); UMAPs coloured by batch and by cell type.

Query mapping (task ``query_mapping``): query cells are embedded **without** a batch token; each gets the
majority label of its ``k = 20`` nearest reference cells (Euclidean); accuracy and macro F1 against the
known labels. With UMAPs on, one UMAP of the batch-corrected embeddings of reference and query together
(``cells.tsv``: ``joint_umap1`` / ``joint_umap2``, panels fig4f / fig4g).

API: :func:`run` (loaded cells + model + :class:`~epiflow.tasks.config.IntegrationConfig`) returns a
:class:`~epiflow.tasks.common.TaskResult`; ``epiflow integrate`` (:mod:`.integration_cli`) writes it
and draws the UMAPs (:mod:`epiflow.plots.integration`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import EpiflowError, VocabularyMismatchError
from ..metrics.table import dataset_label, metric_rows, metrics_frame
from ..tokenize.core import binarize
from .common import TaskResult, resolve_device, umap_coords
from .features import labelled_mask
from .zeroshot import apply_label_map, classification_scores, covered_ccres, obs_column, restrict_to_ccres

if TYPE_CHECKING:
    from .config import IntegrationConfig

log = logging.getLogger(__name__)

TASK = "integration"
QUERY_TASK = "query_mapping"


# ----------------------------------------------------------------------------- OT matching
def _cosine_cost(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.clip(1.0 - an @ bn.T, 0.0, 2.0).astype(np.float64)


def ot_match(a: np.ndarray, b: np.ndarray, *, max_cells: int = 5000, seed: int = 0):
    """Exact-EMD matching (cosine cost, uniform weights) between the rows of ``a`` and ``b``.

    Returns ``(partner_of_a, dist_a, partner_of_b, dist_b)``: for each row of ``a`` the row of ``b``
    receiving most of its mass and their cosine distance, and the same for ``b``. Larger sets are split
    into random chunks of at most ``max_cells`` rows, matched chunk to chunk.
    """
    import ot

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n_chunks = int(max(1, np.ceil(max(len(a), len(b)) / max_cells)))
    pa, pb = rng.permutation(len(a)), rng.permutation(len(b))
    ca, cb = np.array_split(pa, n_chunks), np.array_split(pb, n_chunks)
    part_a = np.empty(len(a), np.int64)
    dist_a = np.empty(len(a))
    part_b = np.empty(len(b), np.int64)
    dist_b = np.empty(len(b))
    for ia, ib in zip(ca, cb):
        if len(ia) == 0 or len(ib) == 0:
            continue
        M = _cosine_cost(a[ia], b[ib])
        plan = ot.emd(np.full(len(ia), 1.0 / len(ia)), np.full(len(ib), 1.0 / len(ib)), M, numItermax=1_000_000)
        ja = plan.argmax(1)
        jb = plan.argmax(0)
        part_a[ia], dist_a[ia] = ib[ja], M[np.arange(len(ia)), ja]
        part_b[ib], dist_b[ib] = ia[jb], M[jb, np.arange(len(ib))]
    return part_a, dist_a, part_b, dist_b


def gmm_keep(dist: np.ndarray, seed: int = 0) -> np.ndarray:
    """Keep-mask of matches in the lower-mean component of a 2-component Gaussian mixture on the
    distances (all kept when there are fewer than 10 matches or the distances are constant)."""
    from sklearn.mixture import GaussianMixture

    d = np.asarray(dist, dtype=np.float64).reshape(-1, 1)
    if len(d) < 10 or float(d.std()) < 1e-12:
        return np.ones(len(d), bool)
    gm = GaussianMixture(2, random_state=seed).fit(d)
    low = int(np.argmin(gm.means_.ravel()))
    return gm.predict(d) == low


def match_batches(emb: np.ndarray, batches, *, max_ot_cells: int = 5000, seed: int = 0) -> pd.DataFrame:
    """OT matches across every pair of batches with the GMM filter.

    Returns one row per (cell, partner in another batch): ``cell``, ``partner`` (row indices),
    ``batch``, ``partner_batch``, ``distance`` (cosine), ``kept``.
    """
    b = np.asarray(batches).astype(str)
    names = sorted(set(b.tolist()))  # plain str (messages show them)
    if len(names) < 2:
        raise EpiflowError(f"integration needs at least 2 batches, found {names}", field="batch_key",
                           fix="pass --batch-key with the column that holds the batches")
    parts = []
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            ia, ib = np.flatnonzero(b == x), np.flatnonzero(b == y)
            pa, da, pb, db = ot_match(emb[ia], emb[ib], max_cells=max_ot_cells, seed=seed)
            keep = gmm_keep(np.concatenate([da, db]), seed)
            parts.append(pd.DataFrame({"cell": np.concatenate([ia, ib]), "partner": np.concatenate([ib[pa], ia[pb]]),
                                       "batch": [x] * len(ia) + [y] * len(ib),
                                       "partner_batch": [y] * len(ia) + [x] * len(ib),
                                       "distance": np.concatenate([da, db]), "kept": keep}))
            log.info("OT %s (%d) <-> %s (%d): %d of %d matches kept by the GMM", x, len(ia), y, len(ib),
                     int(keep.sum()), len(keep))
    return pd.concat(parts, ignore_index=True)


def partner_targets(cells, matches: pd.DataFrame) -> sp.csr_matrix:
    """Binary targets ``[n_cells, n_cCREs]``: cCREs accessible in the cell or in any of its kept partners."""
    n = cells.n_cells
    k = matches[matches["kept"]]
    adj = sp.csr_matrix((np.ones(len(k) + n), (np.concatenate([np.arange(n), k["cell"].to_numpy()]),
                                                np.concatenate([np.arange(n), k["partner"].to_numpy()]))),
                        shape=(n, n))
    x = binarize(cells.counts_csr())
    t = (adj @ x).tocsr()
    t.data[:] = 1.0
    t.sort_indices()
    return t


# ----------------------------------------------------------------------------- fine-tuning
def finetune_reconstruction(model, cells, targets: sp.csr_matrix | None = None, *, batch_ids=None,
                            max_steps: int = 200, batch_size: int = 16, lr: float = 1e-4, max_len: int | None = None,
                            weight_decay: float = 0.01, seed: int = 0, device=None, progress: bool = True,
                            desc: str = "fine-tune") -> list[float]:
    """Fine-tune with signal reconstruction + cell-cCRE alignment (K = 1) towards ``targets`` (binary
    CSR cells x cCREs; default: each cell's own accessible cCREs) with the engine
    (:func:`epiflow.train.engine.fit`, :class:`~epiflow.train.engine.Reconstruction`): CCA queries per
    cell are its target cCREs and as many distinct cCREs drawn from those *not* in the target.
    ``batch_ids`` (int per cell) feed the batch token. Returns the loss per step."""
    from ..train.engine import FitConfig, Reconstruction, fit

    obj = Reconstruction(cells, targets=targets, k=1, max_len=None if max_len is None else int(max_len),
                         heads_at_head_lr=False,
                         conditions=None if batch_ids is None else np.asarray(batch_ids, dtype=np.int64),
                         condition_key="batch_ids")
    cfg = FitConfig(epochs=int(max_steps), max_steps=int(max_steps), batch_size=int(batch_size), lr=float(lr),
                    weight_decay=float(weight_decay), seed=int(seed), device=str(resolve_device(device)),
                    progress=progress, desc=desc)
    return fit(model, obj, cfg)["loss"].tolist()


def embed_cells(model, cells, *, batch_ids=None, device=None, max_len: int = 8190, progress: bool = True,
                desc: str = "embed") -> np.ndarray:
    from ..model.inference import embed_sentences

    return embed_sentences(model, cells.indptr, cells.tokens, batch_ids=batch_ids, device=resolve_device(device),
                           max_len=max_len, progress=progress, desc=desc)


# ----------------------------------------------------------------------------- query mapping
def map_query(ref_emb, ref_labels, query_emb, *, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Majority label of the ``k`` nearest reference cells (Euclidean) for every query cell; ties go to
    the label of the nearer cells. Returns ``(labels, vote fraction)``."""
    from sklearn.neighbors import NearestNeighbors

    ref_labels = np.asarray(ref_labels).astype(str)
    cats, codes = np.unique(ref_labels, return_inverse=True)
    k = int(min(k, len(ref_labels)))
    _, idx = NearestNeighbors(n_neighbors=k).fit(np.asarray(ref_emb)).kneighbors(np.asarray(query_emb))
    votes = np.zeros((len(idx), len(cats)))
    w = 1.0 + 1e-6 * (k - np.arange(k))  # tiny tie-break towards nearer neighbours
    np.add.at(votes, (np.repeat(np.arange(len(idx)), k), codes[idx].ravel()), np.tile(w, len(idx)))
    best = votes.argmax(1)
    frac = np.floor(votes[np.arange(len(idx)), best]) / k
    return cats[best], frac


# ----------------------------------------------------------------------------- evaluation
def evaluate_integration(embeddings: dict[str, np.ndarray], batches, labels, *, dataset: str = "all",
                         n_neighbors: int = 15, seed: int = 0, k_lisi: int = 90, k_kbet: int = 50,
                         umap: bool = True):
    """Metrics rows and UMAP coordinates of each embedding: NMI / ARI (Leiden bisected), cell-type ASW
    (:func:`epiflow.metrics.embedding_scores`), iLISI, kBET, kBET per label, graph connectivity, batch
    ASW. Cells without a label are excluded; ``k_lisi`` / ``k_kbet`` are capped at the labelled cells
    less one. EpiAgent's rows and the integration baselines' (:func:`epiflow.baselines.run.evaluate`)
    come from this one function."""
    from ..metrics import embedding_scores
    from ..metrics.integration import integration_scores

    labels = np.asarray(labels, dtype=object)
    ok = labelled_mask(labels)
    lab = labels[ok].astype(str)
    bat = np.asarray(batches).astype(str)[ok]
    n_types = len(np.unique(lab))
    k_lisi, k_kbet = min(k_lisi, int(ok.sum()) - 1), min(k_kbet, int(ok.sum()) - 1)
    rows, coords = [], {}
    for method, e in embeddings.items():
        x = np.asarray(e, dtype=np.float32)[ok]
        vals = {"n_cells": int(ok.sum()), "n_batches": len(np.unique(bat)), "n_cell_types": n_types}
        if n_types >= 2:
            vals.update(embedding_scores(x, lab, n_neighbors=n_neighbors, seed=seed)[0])
        vals.update(integration_scores(x, bat, lab, k_lisi=k_lisi, k_kbet=k_kbet, k_graph=n_neighbors,
                                       seed=seed))
        rows += metric_rows(TASK, dataset, method, vals)
        log.info("%s: %s", method, ", ".join(f"{k} {v:.3f}" for k, v in vals.items()
                                              if k in ("NMI", "ARI", "iLISI", "kBET", "batch_ASW")))
        if umap:
            coords[method] = umap_coords(x, n_neighbors=n_neighbors, seed=seed)
    return rows, coords, ok


# ----------------------------------------------------------------------------- pipeline
def _embeddings_adata(cells, labels, embs: dict[str, np.ndarray]):
    """obs of the reference cells (+ ``label_mapped``) with one ``obsm`` per method."""
    import anndata as ad

    obs = cells.obs.copy()
    obs.index = (obs["cell_id"].astype(str) if "cell_id" in obs else obs.index.astype(str)).to_numpy()
    if not obs.index.is_unique:
        obs.index = [f"{c}-{i}" for i, c in enumerate(obs.index)]
    obs["label_mapped"] = pd.Series(labels, index=obs.index).astype(str)
    for c in obs.columns:
        if obs[c].dtype == object:
            obs[c] = obs[c].astype(str)
    a = ad.AnnData(obs=obs)
    for m, e in embs.items():
        a.obsm[f"X_{m.replace('-', '_').lower()}"] = np.asarray(e, dtype=np.float32)
    return a


def run(cells, model, cfg: IntegrationConfig, *, query=None, label_map: dict[str, str] | None = None,
        dataset: str | None = None) -> TaskResult:
    """The whole integration (module docstring) of the reference ``cells`` (a Shard,
    :func:`epiflow.tasks.common.load_cells`) with the pretrained ``model`` (its weights are not changed;
    the batch-conditioned model is a new one), settings ``cfg``; ``query``: cells to map (a Shard);
    ``label_map``: original -> shared label (:func:`epiflow.tasks.zeroshot.read_label_map`); ``dataset``:
    the name of the metrics rows (default: the cells' one dataset, else ``all``).

    Returns a :class:`~epiflow.tasks.common.TaskResult`: ``metrics`` (tasks ``integration`` and
    ``query_mapping``), ``tables`` ``batches`` (batch id -> name), ``matches``, with ``cfg.umap``
    ``cells`` (cell, role, batch, cell_type and ``umap1_<method>`` / ``umap2_<method>`` of the labelled
    reference cells; with a query also its rows, role ``query``, with ``prediction`` and the joint UMAP
    ``joint_umap1`` / ``joint_umap2`` of reference and query, :func:`_joint_umap`)
    and, with a query, ``query_predictions``; ``history`` (step, loss); ``models["checkpoint"]`` (the batch-conditioned
    model, authors' layout); ``h5ad["embeddings"]`` (obs + ``obsm`` per method); ``data``:
    ``embeddings`` (method -> array), ``umap`` (method -> UMAP coordinates of the labelled cells, when
    ``cfg.umap``), ``umap_batches`` / ``umap_labels`` (their batches and labels), ``batches`` (the
    batch names), ``dataset``.

    ``cfg.common_ccres``: keep only the cCREs accessible in every batch (reference and query cells alike),
    for batches measured on different peak panels (e.g. Granja 2019's 5,000-peak subset beside
    Buenrostro 2018's 36,000 peaks), where the panel itself would otherwise be the batch effect.
    """
    from .annotation import check_model_vocab

    seed, device, progress = cfg.seed, cfg.device, cfg.progress
    check_model_vocab(model, cells)
    batches = np.asarray(obs_column(cells, cfg.batch_key, "batch")).astype(str)
    names = sorted(set(batches.tolist()))
    if len(names) < 2:  # before any embedding
        raise EpiflowError(f"integration needs at least 2 batches, found {names}", field="batch_key",
                           fix="pass --batch-key with the column that holds the batches")
    bids = pd.Index(names).get_indexer(batches)
    labels = apply_label_map(obs_column(cells, cfg.label_key), label_map)
    ds = dataset_label(cells, dataset)
    shared = None
    if cfg.common_ccres:
        shared = np.logical_and.reduce([covered_ccres(cells.subset(np.flatnonzero(batches == b))) for b in names])
        if not shared.any():
            raise EpiflowError("the batches have no accessible cCRE in common", field="common_ccres",
                               fix="integrate without --common-ccres")
        log.info("keeping the %d cCREs accessible in every batch (of %d)", int(shared.sum()), cells.n_ccres)
        cells = restrict_to_ccres(cells, shared)

    base = model
    z0 = embed_cells(base, cells, device=device, progress=progress, desc="zero-shot embed")
    matches = match_batches(z0, batches, max_ot_cells=cfg.max_ot_cells, seed=seed)
    targets = partner_targets(cells, matches)
    from ..model import derive

    model = derive(base, batches=len(names), seed=seed)  # zero batch tokens: starts as the base
    hist = finetune_reconstruction(model, cells, targets, batch_ids=bids, max_steps=cfg.max_steps,
                                   batch_size=cfg.batch_size, lr=cfg.lr, max_len=cfg.max_len, seed=seed,
                                   device=device, progress=progress, desc="integrate")
    e_bc = embed_cells(model, cells, batch_ids=bids, device=device, progress=progress, desc="embed (batch token)")
    e_nb = embed_cells(model, cells, device=device, progress=progress, desc="embed (no batch token)")
    embs = {"EpiAgent-BC": e_bc, "EpiAgent-BC-nobatch": e_nb, "EpiAgent-zeroshot": z0}
    if cfg.lsi:
        from ..baselines import lsi as run_lsi

        embs["LSI"] = run_lsi(cells.counts_csr(), n_components=min(50, cells.n_cells - 1, cells.n_ccres - 1),
                              seed=seed)
    rows = metric_rows(TASK, ds, "EpiAgent-BC", {
        "matches_total": len(matches), "matches_kept": int(matches["kept"].sum()),
        "steps": len(hist), "final_loss": hist[-1] if hist else float("nan"),
        "mean_target_ccres": float(np.diff(targets.indptr).mean()),
        "mean_own_ccres": float(np.diff(cells.indptr).mean()),
        "n_common_ccres": int(shared.sum()) if shared is not None else cells.n_ccres})
    r, coords, ok = evaluate_integration(embs, batches, labels, dataset=ds, seed=seed, umap=cfg.umap)
    rows += r

    tables = {"batches": pd.DataFrame({"index": range(len(names)), "batch": names}), "matches": matches}
    qres = q_emb = None
    if query is not None:
        qres, qrows, q_emb = _map_query(query, cells.n_ccres, shared, base, model, cfg, label_map, labels,
                                        {"EpiAgent-BC": e_bc, "EpiAgent-BC-nobatch": e_nb, "EpiAgent-zeroshot": z0})
        tables["query_predictions"] = qres
        rows += qrows
    if coords:  # the UMAPs of the labelled cells, per embedding (panels fig4c / fig4d; fig4f / fig4g)
        from .annotation import cell_ids

        umap_tab = pd.DataFrame({"cell": cell_ids(cells)[ok], "role": "reference", "batch": batches[ok],
                                 "cell_type": np.asarray(labels, dtype=object)[ok].astype(str)})
        for method, xy in coords.items():
            umap_tab[f"umap1_{method}"] = xy[:, 0]
            umap_tab[f"umap2_{method}"] = xy[:, 1]
        if qres is not None and q_emb is not None:
            umap_tab = _joint_umap(umap_tab, e_bc[ok], qres, q_emb, seed=seed)
        tables["cells"] = umap_tab
    history = pd.DataFrame({"step": np.arange(1, len(hist) + 1), "loss": hist})
    return TaskResult(metrics=metrics_frame(rows), tables=tables, history=history, models={"checkpoint": model},
                      h5ad={"embeddings": _embeddings_adata(cells, labels, embs)},
                      data={"embeddings": embs, "umap": coords, "umap_batches": batches[ok],
                            "umap_labels": np.asarray(labels, dtype=object)[ok].astype(str), "batches": names,
                            "dataset": ds})


def _map_query(q, n_ccres: int, shared, base, model, cfg: IntegrationConfig, label_map, ref_lab,
               ref_embs: dict[str, np.ndarray]) -> tuple[pd.DataFrame, list, np.ndarray]:
    """Query mapping: the query embedded without a batch token (fine-tuned model, and zero-shot),
    labelled by the ``k_query`` nearest labelled reference cells; the predictions, metric rows and the query's
    embeddings by the fine-tuned model (no batch token)."""
    device, progress = cfg.device, cfg.progress
    if q.n_ccres != n_ccres:
        raise VocabularyMismatchError(f"the query has {q.n_ccres} cCREs but the reference {n_ccres}",
                                      field="query", fix="map both onto the checkpoint's cCRE vocabulary")
    if shared is not None:
        q = restrict_to_ccres(q, shared)
    qkey = cfg.query_label_key or cfg.label_key
    if qkey in q.obs or cfg.query_label_key:  # a named query label column must exist
        qlab = apply_label_map(obs_column(q, qkey), label_map)
    else:  # an unlabelled query (e.g. a new dataset): predictions only, no scores
        qlab = np.full(q.n_cells, None, dtype=object)
    qz = embed_cells(base, q, device=device, progress=progress, desc="embed query (zero-shot)")
    qe = embed_cells(model, q, device=device, progress=progress, desc="embed query (no batch token)")
    qds = dataset_label(q)
    refm = np.array([v is not None for v in ref_lab])
    qres = pd.DataFrame({"cell": q.obs["cell_id"].astype(str).to_numpy() if "cell_id" in q.obs
                         else np.arange(q.n_cells).astype(str), "label": qlab})
    qok = np.array([v is not None for v in qlab])
    rows: list = []
    for method, qq in (("EpiAgent-BC", qe), ("EpiAgent-BC-nobatch", qe), ("EpiAgent-zeroshot", qz)):
        pred, frac = map_query(ref_embs[method][refm], ref_lab[refm], qq, k=cfg.k_query)
        qres[f"pred_{method}"] = pred
        qres[f"vote_{method}"] = frac
        vals = {"n_query_cells": q.n_cells, "n_query_labelled": int(qok.sum()), "k": cfg.k_query}
        if qok.any():
            vals.update(classification_scores(qlab[qok], pred[qok]))
        rows += metric_rows(QUERY_TASK, qds, method, vals)
    return qres, rows, qe


def _joint_umap(ref_tab: pd.DataFrame, ref_emb: np.ndarray, qres: pd.DataFrame, q_emb: np.ndarray, *,
                seed: int = 0, n_neighbors: int = 15) -> pd.DataFrame:
    """``cells.tsv`` with the query: one UMAP fitted on the batch-corrected embeddings of the labelled
    reference cells (with their batch token) and of the query cells (fine-tuned, no batch token) together
    (``joint_umap1`` / ``joint_umap2``), the query's rows appended (``role`` query, ``batch`` query,
    ``cell_type`` its known label or empty, ``prediction`` the label transferred by the batch-corrected
    embedding). The reference's own UMAP columns (``umap1_<method>``) are unchanged; empty for query rows."""
    xy = umap_coords(np.concatenate([np.asarray(ref_emb, np.float32), np.asarray(q_emb, np.float32)]),
                     n_neighbors=n_neighbors, seed=seed)
    n = len(ref_tab)
    ref = ref_tab.assign(prediction=None)
    q = pd.DataFrame({"cell": qres["cell"].to_numpy(), "role": "query", "batch": "query",
                      "cell_type": qres["label"].to_numpy(), "prediction": qres["pred_EpiAgent-BC"].to_numpy()})
    tab = pd.concat([ref, q], ignore_index=True)
    tab["joint_umap1"] = xy[:, 0]
    tab["joint_umap2"] = xy[:, 1]
    log.info("joint UMAP of %d reference and %d query cells (EpiAgent-BC)", n, len(q))
    return tab
