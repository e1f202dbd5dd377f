"""Fine-tuning machinery of the perturbation tasks (SPEC §5): cells, OT matching, model with a
conditional token, the training loop and decoding.

* the cells of a task are a :class:`~epiflow.corpus.shard.Shard` (the one cell container, loaded by
  :func:`epiflow.tasks.common.load_cells`); :func:`labelled_cells` keeps those whose label is set;
  :meth:`Shard.binary` is the cells x cCREs 0/1 accessibility.
* :func:`ot_match` - exact optimal transport (POT ``ot.emd``) between unperturbed and perturbed cells
  with a cosine cost and uniform weights; every perturbed cell gets the unperturbed cell that carries
  most of its mass as partner. :func:`ot_match_groups` does it per group (cell type / perturbation).
* the model: the pretrained EpiAgent plus a learnable [PER] token (``condition_embedding``, 1 row,
  initialised N(0, s) with s the standard deviation of the cCRE input embeddings,
  :func:`epiflow.model.token_scale`) or the gene-perturbation GNN over a gene graph
  (``perturbation_gnn``; its LayerNorm output is on that scale already), made by
  :func:`epiflow.model.derive` (``conditions=1`` / ``gene_graph=``); both are added to the input at
  position 0.
* :func:`finetune_conditioned` - training (on :func:`epiflow.train.engine.fit`, with the
  :func:`fit_config` of the task's settings, :class:`epiflow.tasks.config.PerturbationConfig`): every example is (input cell, target cell, conditional
  token or -1, class label). Loss = CCA (K negatives per positive, default 1; positives = ALL
  accessible cCREs of the target cell) + SR (BCE, pos_weight of the checkpoint) on the target
  cell + ``aux_weight`` (0.01) x BCE of a linear classifier "unperturbed (0) vs perturbed or
  predicted (1)" on the cell embedding. AdamW; ``epochs`` passes over the shuffled examples or
  ``max_steps`` steps.
* :func:`decode_mean` - decoder probabilities of cells (with or without the token). With
  ``calibrate`` the logits are shifted by ``-log(pos_weight)``: the minimiser of BCE with
  ``pos_weight`` w is ``sigmoid(x) = w p / (w p + 1 - p)``, so ``sigmoid(x - log w)`` estimates p.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..corpus.shard import Shard
from ..errors import CheckpointError, ConfigError, InputFormatError
from .common import resolve_device
from .config import PerturbationConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- cells
def _missing(values: pd.Series) -> np.ndarray:
    """Where a label is missing: :func:`epiflow.tasks.features.labelled_mask`'s rule (NaN, empty, 'nan',
    'NA', 'unknown' as map-dataset writes, ...), the one every task uses."""
    from .features import labelled_mask

    return ~labelled_mask(values.to_numpy(dtype=object))


def labelled_cells(cells: Shard, key: str) -> Shard:
    """The cells whose obs ``key`` is set (all of them: ``cells`` itself)."""
    if key not in cells.obs:
        raise InputFormatError(f"obs has no column {key!r}", field=key,
                               fix="pass the obs column holding the condition / perturbation labels")
    keep = ~_missing(cells.obs[key])
    if not keep.any():
        raise InputFormatError(f"no cell has obs column {key!r} set", field=key,
                               fix="pass the obs column holding the condition / perturbation labels")
    return cells if keep.all() else cells.subset(np.flatnonzero(keep))


# ----------------------------------------------------------------------------- OT
def ot_match(source, target, *, max_cells: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact OT (``ot.emd``, cosine cost, uniform weights) between ``source`` [n, D] (unperturbed) and
    ``target`` [m, D] (perturbed) cells. Returns ``(partner_of_target [m], partner_of_source [n])``:
    for each target cell the source cell holding most of its mass, and vice versa.

    Sets of more than ``max_cells`` cells are matched in random chunks of at most ``max_cells`` a side
    (:func:`epiflow.tasks.integration.ot_match`, the integration's matching): the exact plan needs
    n x m float64 cost and plan matrices (~25 bytes per pair: 62 GB at 50,000 x 50,000) and its
    time grows faster than n x m."""
    import ot

    from .integration import _cosine_cost
    from .integration import ot_match as chunked_ot_match

    s = np.asarray(source, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if len(s) == 0 or len(t) == 0:
        raise InputFormatError("OT matching needs at least one cell on each side", field="cells")
    if max(len(s), len(t)) > max_cells:
        part_s, _, part_t, _ = chunked_ot_match(s, t, max_cells=max_cells, seed=seed)
        return part_t, part_s
    M = _cosine_cost(s, t)
    plan = ot.emd(np.full(len(s), 1.0 / len(s)), np.full(len(t), 1.0 / len(t)), M, numItermax=1_000_000)
    return plan.argmax(0).astype(np.int64), plan.argmax(1).astype(np.int64)


def ot_match_groups(emb, ctrl_rows, pert_rows, groups) -> np.ndarray:
    """Per group, the OT partner (a row of ``emb`` among ``ctrl_rows``) of every row in ``pert_rows``.
    ``groups``: group label per row of ``emb``; controls are matched within the perturbed cell's
    group. Returns partner rows aligned with ``pert_rows`` (-1 where the group has no control)."""
    groups = np.asarray(groups).astype(str)
    ctrl_rows, pert_rows = np.asarray(ctrl_rows, np.int64), np.asarray(pert_rows, np.int64)
    out = np.full(len(pert_rows), -1, dtype=np.int64)
    for g in np.unique(groups[pert_rows]):
        c = ctrl_rows[groups[ctrl_rows] == g]
        sel = np.flatnonzero(groups[pert_rows] == g)
        if len(c) == 0:
            continue
        partner, _ = ot_match(emb[c], emb[pert_rows[sel]])
        out[sel] = c[partner]
    return out


# ----------------------------------------------------------------------------- model
def check_base_model(model) -> None:
    """The perturbation tasks decode with the signal decoder and train the CCA head: a base model."""
    if getattr(model, "signal_decoder", None) is None or getattr(model, "fc1_for_CCA", None) is None:
        raise CheckpointError(f"the checkpoint has no signal decoder / CCA head (kind {model.config.kind})",
                              fix="fine-tune from a pretrained (base) EpiAgent checkpoint")


# ----------------------------------------------------------------------------- training
WEIGHT_DECAY = 0.0  # AdamW weight decay of the perturbation fine-tuning


def fit_config(settings: PerturbationConfig):
    """The engine's :class:`~epiflow.train.engine.FitConfig` of the task's settings: the pretrained
    weights at ``lr``, the new ones ([PER] token, GNN, auxiliary head) at ``new_lr``."""
    from ..train.engine import FitConfig

    st = settings
    return FitConfig(epochs=float(st.epochs), max_steps=st.max_steps, batch_size=int(st.batch_size), lr=float(st.lr),
                     head_lr=float(st.new_lr), weight_decay=WEIGHT_DECAY, seed=int(st.seed),
                     device=str(resolve_device(st.device)), progress=st.progress, desc="fine-tune")


def finetune_conditioned(model, cells: Shard, examples: pd.DataFrame, *, mode: str,
                         settings: PerturbationConfig | None = None):
    """Fine-tune ``model`` in place on ``examples`` (columns ``input``, ``target`` = rows of ``cells``,
    ``cond`` = token id or -1, ``label`` = 0 unperturbed / 1 perturbed or predicted) with the engine
    (:func:`epiflow.train.engine.fit`): CCA (K = ``cca_k`` distinct negatives per positive from the
    target's inaccessible cCREs) + SR of the *target* cell from the *input* cell and its conditional
    token, plus an auxiliary perturbed / unperturbed head (weight ``aux_weight``). The new parameters
    ([PER] token, GNN, auxiliary head) train at ``new_lr``. ``settings``: the task's
    (:class:`~epiflow.tasks.config.StimulationConfig` / :class:`~epiflow.tasks.config.GeneticConfig`).

    Returns ``(model, aux_head, history)``; ``history`` is a list of per-step dicts."""
    from ..train.engine import Reconstruction, fit

    st = settings or PerturbationConfig()
    if mode not in ("condition", "gene"):
        raise ConfigError(f"unknown conditioning mode {mode!r}")
    if len(examples) == 0:
        raise InputFormatError("no training examples", field="examples")
    obj = Reconstruction(cells, input_rows=examples["input"].to_numpy(np.int64), targets=cells,
                         target_rows=examples["target"].to_numpy(np.int64), k=int(st.cca_k),
                         max_len=min(st.max_len or model.config.max_rank - 2, model.config.max_rank - 2),
                         conditions=examples["cond"].to_numpy(np.int64),
                         condition_key="condition_ids" if mode == "condition" else "perturbation",
                         aux_labels=examples["label"].to_numpy(np.float32), weights={"aux": float(st.aux_weight)},
                         heads_at_head_lr=False, new_prefixes=("condition_embedding", "perturbation_gnn"))
    cfg = fit_config(st)
    hist = fit(model, obj, cfg)
    history = [{"step": int(r["step"]) - 1, "loss": r["loss"], "cca": r["cca"], "sr": r["sr"], "aux": r["aux"]}
               for r in hist.to_dict("records")]
    return model, obj.aux, history


# ----------------------------------------------------------------------------- decoding
def decode(model, cells: Shard, rows, *, mode: str | None = None, cond: int | np.ndarray = -1,
           batch_size: int = 64, calibrate: bool = True, device=None, max_len: int | None = None) -> np.ndarray:
    """Decoder probabilities ``[len(rows), n_cCRE]`` (float32) of ``cells[rows]`` encoded with the
    conditional token ``cond`` (-1 = none); :func:`epiflow.train.engine.predict`."""
    from ..train.engine import predict

    if mode is not None and mode not in ("condition", "gene"):
        raise ConfigError(f"unknown conditioning mode {mode!r}")
    dev = resolve_device(device, model)
    return predict(model, cells, "signal", rows=rows, conditions=None if mode is None else cond,
                   condition_key="condition_ids" if mode == "condition" else "perturbation", calibrate=calibrate,
                   max_len=max_len, max_cells=int(batch_size), device=dev)


def zero_shot_embeddings(model, cells: Shard, *, device=None, progress: bool = False) -> np.ndarray:
    from ..model.inference import embed_sentences

    return embed_sentences(model, cells.indptr, cells.tokens, device=resolve_device(device), progress=progress,
                           desc="zero-shot embed")
