"""One training engine for every fine-tuning task (issue #18).

``fit(model, objective, config)`` is the only fine-tuning loop of epiflow: annotation, imputation,
integration, knockout, perturbation, zero-shot annotation and fine-tuned feature extraction all call
it, each with an *objective* that turns a batch of example indices into named loss terms. The engine
owns everything the tasks used to do differently:

* batches: a new permutation of the examples every epoch, ``batch_size`` examples a step, or a token
  budget (``batch_tokens``) over length-sorted buckets of 512 shuffled examples;
* the optimiser: AdamW, one parameter-group policy (:func:`epiflow.train.optim.finetune_param_groups`:
  the objective's head parameters at ``head_lr``, the rest at ``lr``; no weight decay on biases,
  norms and embeddings);
* the learning-rate schedule (:mod:`epiflow.train.optim`: constant / linear / cosine with warm-up),
  gradient clipping, bf16 autocast on CUDA, the progress bar and the per-step log.

``predict(model, cells, head)`` is the matching inference (embedding, class probabilities, decoded
signal) that the tasks use.

Pretraining keeps its own driver (:mod:`epiflow.train.pretrain`: DDP, memory-lean mode, exact
resume) with the same loss functions (:mod:`epiflow.train.objectives`).

Objectives (:class:`Classification`, :class:`Reconstruction`) read cells from any container with
``indptr`` / ``tokens`` (token ids, rank-ordered CSR; ``tfidf`` for the MSE variant): a
:class:`~epiflow.corpus.shard.Shard`, the one cell container (:meth:`Shard.from_any`).
CCA negatives are always the paper's: for every positive, K distinct cCREs drawn without replacement
from the cCREs *not* accessible in the target cell (:func:`epiflow.train.sampling.sample_complement`),
keyed by (seed, epoch, example) so that they do not depend on how a step is batched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..tokenize import NUM_SPECIAL, gather_rows

log = logging.getLogger(__name__)

SR_LOSSES = ("bce", "multinomial", "mse")


# ----------------------------------------------------------------------------- config
@dataclass
class FitConfig:
    """Settings of :func:`fit` (every fine-tuning verb maps its flags onto these fields)."""

    epochs: float = 1.0               # passes over the examples (fractional: that share of a pass)
    max_steps: int | None = None      # cap on the optimiser steps
    batch_size: int = 16              # examples per step (ignored when batch_tokens is set)
    batch_tokens: int | None = None   # token budget per step instead (length-bucketed batches)
    lr: float = 1e-4
    head_lr: float | None = None      # the objective's head parameters (default: lr)
    weight_decay: float = 0.01
    schedule: str = "constant"        # constant | linear | cosine | inverse_sqrt (train.optim)
    warmup: int = 0                   # warm-up steps
    warmup_fraction: float = 0.0      # or this share of the planned steps (the larger of the two)
    clip_grad: float | None = 1.0
    amp: bool = True                  # bf16 autocast on CUDA (no effect on CPU)
    seed: int = 0
    device: str | None = None         # None: where the model is; "auto": CUDA when available
    progress: bool = True
    desc: str = "fine-tune"

    def check(self) -> None:
        if not float(self.epochs) > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}", field="epochs")
        if not float(self.lr) > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}", field="lr")
        if self.head_lr is not None and not float(self.head_lr) > 0:
            raise ConfigError(f"head_lr must be > 0, got {self.head_lr}", field="head_lr")
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}", field="batch_size")
        if self.batch_tokens is not None and int(self.batch_tokens) < 1:
            raise ConfigError(f"batch_tokens must be >= 1, got {self.batch_tokens}", field="batch_tokens")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}", field="max_steps")
        if int(self.warmup) < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}", field="warmup")


@dataclass
class LossOutput:
    """What an objective returns for one batch: named loss terms, their weights, and metrics to log."""

    terms: dict[str, torch.Tensor]
    weights: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        parts = [float(self.weights.get(k, 1.0)) * v for k, v in self.terms.items()]
        if not parts:
            raise ConfigError("the objective returned no loss term", field="objective")
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total


@dataclass
class StepContext:
    """What the engine tells an objective about the current step."""

    epoch: int
    step: int
    seed: int
    device: torch.device
    rng: np.random.Generator


class Objective:
    """Base class: ``n_examples``, ``__call__(model, rows, ctx) -> LossOutput``; optional
    ``lengths()`` (tokens per example, for token-budget batches), ``head_prefixes`` (parameter-name
    prefixes trained at ``head_lr``) and ``modules()`` (extra trainable modules, e.g. an auxiliary head)."""

    head_prefixes: tuple[str, ...] = ()
    n_examples: int = 0

    def lengths(self) -> np.ndarray | None:
        return None

    def setup(self, model) -> None:
        """Called by :func:`fit` before the optimiser is built (create extra modules here)."""
        self.input_cap = max_input_len(model, getattr(self, "max_len", None))

    def _padded(self, indptr, rows) -> np.ndarray:
        """Padded input length of each example (for token budgets): ``min(len, cap) + 2``."""
        lens = np.diff(np.asarray(indptr))[rows]
        cap = getattr(self, "input_cap", None)
        return (lens if cap is None else np.minimum(lens, cap)) + 2

    def modules(self) -> list[torch.nn.Module]:
        return []

    def __call__(self, model, rows: np.ndarray, ctx: StepContext) -> LossOutput:  # pragma: no cover
        raise NotImplementedError


# ----------------------------------------------------------------------------- helpers
def resolve_device(device=None, model=None) -> torch.device:
    """None: the model's device (CPU without a model); "auto": CUDA when available; else as torch spells it."""
    if device is None and model is not None:
        return next(model.parameters()).device
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}", field="device", fix="use auto, cpu, cuda or cuda:N") from None


def autocast(device: torch.device, enabled: bool = True):
    """bf16 (fp16 without bf16) autocast on CUDA; nothing on CPU."""
    from ..model.inference import autocast_dtype

    dt = autocast_dtype(device) if enabled else None
    return contextlib.nullcontext() if dt is None else torch.autocast(device_type=device.type, dtype=dt)


def max_input_len(model, max_len: int | None) -> int:
    """Sentence tokens fed to the model: ``max_len`` capped at the rank embedding (``max_rank - 2``)."""
    cap = int(model.config.max_rank) - 2
    return cap if max_len is None else max(1, min(int(max_len), cap))


def input_ids(cells, rows, max_len: int, keys: np.ndarray | None = None) -> torch.Tensor:
    """``[CLS] sentence [SEP]`` of ``rows``: the top ``max_len`` tokens (``keys`` None: inference) or,
    for sentences longer than ``max_len``, a rank-preserving random subsample keyed by ``keys`` (one
    :mod:`epiflow.train.rng` key per row: training, as pretraining does)."""
    from ..tokenize import build_input_ids, subsample_sentences, truncate_sentences
    from . import rng as krng

    ptr, tok = gather_rows(cells.indptr, rows, cells.tokens)
    lens = np.diff(ptr)
    if keys is not None and lens.max(initial=0) > max_len:
        ptr, tok = subsample_sentences(ptr, tok, max_len, krng.KeyedUniform(krng.per_element_uniform(keys, lens)))
    else:
        ptr, tok = truncate_sentences(ptr, tok, max_len)
    return torch.from_numpy(build_input_ids(ptr, tok))


def train_keys(ctx: "StepContext", rows) -> np.ndarray:
    """The subsampling keys of a training batch (by seed, epoch and example index)."""
    from . import rng as krng

    return krng.cell_keys(ctx.seed, ctx.epoch, krng.SUBSAMPLE, np.asarray(rows, dtype=np.int64))


def cca_queries(pos_ptr: np.ndarray, pos_ccres: np.ndarray, n_ccres: int, k: int, keys: np.ndarray,
                max_pos: int | None = None):
    """CCA queries of a batch: the positives (all, or the first ``max_pos`` of each row) and
    ``K x positives`` distinct negatives per row from the cCREs not in the row's positives.

    Returns ``(rows, ccres (0-based), labels, n_pos_rows)`` as numpy arrays."""
    from .sampling import sample_complement

    lens = np.diff(pos_ptr)
    r = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    if max_pos is not None:
        keep = (np.arange(len(pos_ccres)) - np.repeat(pos_ptr[:-1], lens)) < int(max_pos)
        qp, qr = pos_ccres[keep], r[keep]
        n_pos = np.minimum(lens, int(max_pos))
    else:
        qp, qr, n_pos = pos_ccres, r, lens
    neg_ptr, neg = sample_complement(keys, pos_ptr, pos_ccres, int(n_ccres), int(k) * n_pos)
    rows = np.concatenate([qr, np.repeat(np.arange(len(lens), dtype=np.int64), np.diff(neg_ptr))])
    ccres = np.concatenate([qp, neg]).astype(np.int64)
    labels = np.concatenate([np.ones(len(qp), np.float32), np.zeros(len(neg), np.float32)])
    return rows, ccres, labels


def _budget_batches(order: np.ndarray, lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Token-budget batches: buckets of 512 shuffled examples sorted by length, cut at ``budget``
    padded tokens (at least one example a batch)."""
    from .data import _cut_budget

    out = []
    for a in range(0, len(order), 512):
        bucket = order[a:a + 512]
        bucket = bucket[np.argsort(lengths[bucket], kind="stable")]
        cuts = _cut_budget(lengths[bucket], int(budget), 1, None)
        out += [bucket[x:y] for x, y in zip(cuts[:-1], cuts[1:])]
    return out


def epoch_batches(n: int, cfg: FitConfig, rng: np.random.Generator, lengths: np.ndarray | None) -> list[np.ndarray]:
    """The batches of one epoch (example indices), in the order they are trained."""
    order = rng.permutation(n)
    if cfg.batch_tokens is None:
        return [order[a:a + int(cfg.batch_size)] for a in range(0, n, int(cfg.batch_size))]
    if lengths is None:
        raise ConfigError("this objective has no lengths; use batch_size instead of batch_tokens",
                          field="batch_tokens")
    batches = _budget_batches(order, np.asarray(lengths, dtype=np.int64), int(cfg.batch_tokens))
    return [batches[i] for i in rng.permutation(len(batches))]


def planned_steps(n: int, cfg: FitConfig, lengths: np.ndarray | None = None) -> int:
    """Optimiser steps :func:`fit` will take (``epochs`` passes, capped at ``max_steps``)."""
    if cfg.batch_tokens is None:
        per_epoch = math.ceil(n / int(cfg.batch_size))
    else:
        per_epoch = len(_budget_batches(np.arange(n), np.asarray(lengths, dtype=np.int64), int(cfg.batch_tokens)))
    steps = max(1, int(math.ceil(float(cfg.epochs) * per_epoch)))
    return steps if cfg.max_steps is None else min(steps, int(cfg.max_steps))


# ----------------------------------------------------------------------------- the loop
def fit(model, objective: Objective, config: FitConfig | None = None, **overrides) -> pd.DataFrame:
    """Train ``model`` (and the objective's extra modules) in place; returns the per-step log
    (``step`` from 1, ``epoch`` from 0, ``loss``, ``lr``, every loss term and metric)."""
    from tqdm.auto import tqdm

    from .optim import finetune_param_groups, make_scheduler

    cfg = dataclasses.replace(config or FitConfig(), **overrides)
    cfg.check()
    n = int(objective.n_examples)
    if n < 1:
        raise ConfigError("no training examples", field="cells", fix="check the cell selection and labels")
    dev = resolve_device(cfg.device, model)
    model.to(dev).train()
    torch.manual_seed(int(cfg.seed))  # the objective's new modules and dropout
    objective.setup(model)
    extra = [m.to(dev).train() for m in objective.modules()]
    rng = np.random.default_rng([int(cfg.seed), 1818])
    lengths = objective.lengths()
    total = planned_steps(n, cfg, lengths)
    named = list(model.named_parameters()) + [(f"extra{i}.{nm}", p) for i, m in enumerate(extra)
                                               for nm, p in m.named_parameters()]
    head_prefixes = tuple(objective.head_prefixes) + tuple(f"extra{i}." for i in range(len(extra)))
    opt = torch.optim.AdamW(finetune_param_groups(named, head_prefixes, float(cfg.lr),
                                                  float(cfg.head_lr if cfg.head_lr is not None else cfg.lr),
                                                  float(cfg.weight_decay)))
    sched = make_scheduler(opt, cfg.schedule, max(int(cfg.warmup), int(float(cfg.warmup_fraction) * total)), total)
    params = [p for _, p in named if p.requires_grad]
    rows_log: list[dict[str, Any]] = []
    step, epoch = 0, 0
    bar = tqdm(total=total, desc=cfg.desc, unit="step", disable=not cfg.progress, leave=False)
    try:
        while step < total:
            for rows in epoch_batches(n, cfg, rng, lengths):
                if step >= total:
                    break
                ctx = StepContext(epoch=epoch, step=step, seed=int(cfg.seed), device=dev, rng=rng)
                with autocast(dev, cfg.amp):
                    out = objective(model, rows, ctx)
                loss = out.loss
                if not torch.isfinite(loss.detach()):
                    raise ConfigError(f"{cfg.desc}: loss is not finite at step {step + 1}", field="lr",
                                      fix="lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(params, float(cfg.clip_grad))
                lr_now = float(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
                step += 1
                rec = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "lr": lr_now}
                rec.update({k: float(v.detach()) for k, v in out.terms.items()})
                rec.update(out.metrics)
                rows_log.append(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            epoch += 1
    finally:
        bar.close()
        model.eval()
        for m in extra:
            m.eval()
    hist = pd.DataFrame(rows_log)
    if len(hist):
        log.info("%s: %d steps, %d epochs, loss %.4f -> %.4f", cfg.desc, step, epoch,
                 hist["loss"].iloc[0], hist["loss"].iloc[-1])
    return hist


# ----------------------------------------------------------------------------- inference
HEADS = ("embedding", "classify", "logits", "signal")


@torch.no_grad()
def predict(model, cells, head="embedding", *, rows=None, conditions=None, condition_key: str = "batch_ids",
            columns=None, calibrate: bool = False, max_len: int | None = None, batch_tokens: int = 65_536,
            max_cells: int = 4096, device=None, progress: bool = False, desc: str = "predict"):
    """What the model says about ``cells`` (rows ``rows``, default all), in eval mode with each cell's
    top ``max_len`` tokens, in token-budget batches:

    * ``"embedding"``: the cell embedding ``[n, dim]``;
    * ``"classify"``: class probabilities ``[n, C]`` (softmax); ``"logits"``: classifier logits;
    * ``"signal"``: signal-decoder logits ``[n, len(columns)]``, or probabilities with ``calibrate``
      (``sigmoid(x - log pos_weight)``, the accessibility probability under the SR criterion).

    ``head`` may be a tuple of those: then a dict of arrays from one pass. ``conditions``: one int per
    predicted row (or one for all) fed as ``condition_key`` (-1 = none). Float32 arrays in ``rows`` order."""
    from ..model.inference import inference_context, token_budget_batches

    heads = (head,) if isinstance(head, str) else tuple(head)
    bad = [h for h in heads if h not in HEADS]
    if bad:
        raise ConfigError(f"unknown prediction head(s) {bad}", field="head", fix=f"use {', '.join(HEADS)}")
    dev = resolve_device(device, model)
    rows = np.arange(len(np.asarray(cells.indptr)) - 1) if rows is None else np.asarray(rows, dtype=np.int64)
    ml = max_input_len(model, max_len)
    cond = None if conditions is None else np.broadcast_to(np.asarray(conditions, dtype=np.int64), rows.shape)
    cols = None if columns is None else torch.as_tensor(np.asarray(columns, dtype=np.int64), device=dev)
    shift = math.log(float(model.pos_weight("SR"))) if calibrate else 0.0
    was_training = model.training
    model.to(dev).eval()
    out: dict[str, np.ndarray] = {}
    lens = np.minimum(np.diff(np.asarray(cells.indptr))[rows], ml) + 2
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), desc=desc, unit="cell", disable=not progress, leave=False)
    try:
        with inference_context(dev):
            for sel in token_budget_batches(lens, batch_tokens, max_cells):
                ids = input_ids(cells, rows[sel], ml, None).to(dev)
                kw = {}
                if cond is not None:
                    c = np.ascontiguousarray(cond[sel])
                    if (c >= 0).any():
                        kw[condition_key] = torch.from_numpy(c).to(dev)
                cell = model(ids, **kw).cell_embedding
                for h in heads:
                    if h == "embedding":
                        v = cell
                    elif h in ("classify", "logits"):
                        v = model.classify(cell).float()
                        v = torch.softmax(v, -1) if h == "classify" else v
                    else:
                        v = model.signal_logits(cell).float()
                        v = v if cols is None else v[:, cols]
                        v = torch.sigmoid(v - shift) if calibrate else v
                    v = v.float().cpu().numpy()
                    if h not in out:
                        out[h] = np.zeros((len(rows), v.shape[1]), dtype=np.float32)
                    out[h][sel] = v
                bar.update(len(sel))
    finally:
        bar.close()
        model.train(was_training)
    for h in heads:
        if h not in out:  # no rows
            width = {"embedding": model.config.dim, "signal": model.n_ccres if cols is None else len(cols)}.get(
                h, int(getattr(model.config, "num_classes", 0)))
            out[h] = np.zeros((0, width), dtype=np.float32)
    return out[heads[0]] if isinstance(head, str) else out


# ----------------------------------------------------------------------------- objectives
class Classification(Objective):
    """Cross-entropy (``linear`` head) or the authors' focal loss on the cell embedding.

    ``cells``: container with ``indptr`` / ``tokens``; ``rows``: the cells to train on; ``labels``:
    class index per row of ``rows``. Logs the batch accuracy. Head: ``classifier.*``."""

    head_prefixes = ("classifier.",)

    def __init__(self, cells, rows, labels, *, loss: str = "ce", focal_gamma: float = 2.0,
                 max_len: int | None = None, model_kwargs: Callable | None = None):
        if loss not in ("ce", "focal"):
            raise ConfigError(f"unknown classification loss {loss!r}", field="loss", fix="use ce or focal")
        self.cells = cells
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if len(self.labels) != len(self.rows):
            raise ConfigError(f"{len(self.labels)} labels for {len(self.rows)} cells", field="labels")
        self.loss, self.gamma, self.max_len = loss, float(focal_gamma), max_len
        self.n_examples = len(self.rows)

    def lengths(self):
        return self._padded(self.cells.indptr, self.rows)

    def __call__(self, model, rows, ctx):
        from ..model.losses import classification_loss, focal_loss

        ids = input_ids(self.cells, self.rows[rows], max_input_len(model, self.max_len), train_keys(ctx, rows))
        ids = ids.to(ctx.device)
        logits = model.classify(model(ids).cell_embedding).float()
        y = self.labels[rows].to(ctx.device)
        lv = classification_loss(logits, y) if self.loss == "ce" else focal_loss(logits, y, gamma=self.gamma)
        return LossOutput({"classify": lv}, metrics={"accuracy": float((logits.argmax(1) == y).float().mean())})


class Reconstruction(Objective):
    """Cell-cCRE alignment + signal reconstruction of a target profile (the paper's fine-tuning).

    Every example encodes the input cell ``input_rows[i]`` of ``cells`` and reconstructs a *target*:
    by default the cell itself (all its accessible cCREs, not only the ``max_len`` it was given),
    otherwise row ``target_rows[i]`` of ``targets`` (a cell container, or a scipy CSR cells x cCREs
    whose non-zeros are the accessible cCREs and, for ``sr="mse"``, their values).

    * CCA: BCE with ``pos_weight = k`` on the positives (the first ``cca_max_pos`` of each target,
      or all) and ``k`` negatives per positive drawn without replacement from the target's
      inaccessible cCREs;
    * SR: ``bce`` (the paper: BCE, pos_weight of the model's SR criterion, mean over all entries),
      ``multinomial`` (depth-invariant option) or ``mse`` (regression of the target's TF-IDF values,
      0 elsewhere; the imputation variant) or None (CCA only);
    * ``conditions``: one int per example fed to the model as ``condition_key`` (``batch_ids``,
      ``condition_ids`` or ``perturbation``), -1 = none;
    * ``aux_labels``: a 0/1 label per example for an auxiliary linear head on the cell embedding
      (BCE, weight ``weights["aux"]``), e.g. perturbed vs unperturbed.

    Head parameters (``head_lr``): the signal decoder, the CCA head, and ``new_prefixes``.
    """

    def __init__(self, cells, *, input_rows=None, targets=None, target_rows=None, sr: str | None = "bce",
                 cca: bool = True, k: int = 1, cca_max_pos: int | None = None, max_len: int | None = None,
                 conditions=None, condition_key: str = "batch_ids", aux_labels=None,
                 weights: dict | None = None, new_prefixes: tuple[str, ...] = (),
                 heads_at_head_lr: bool = True, sr_pos_weight: float | None = None):
        import scipy.sparse as sp

        if sr is not None and sr not in SR_LOSSES:
            raise ConfigError(f"unknown SR loss {sr!r}", field="sr_objective", fix=f"use one of {', '.join(SR_LOSSES)}")
        if int(k) < 1:
            raise ConfigError(f"k (CCA negatives per positive) must be >= 1, got {k}", field="k")
        self.cells = cells
        n_cells = len(np.asarray(cells.indptr)) - 1
        self.input_rows = np.arange(n_cells, dtype=np.int64) if input_rows is None else \
            np.asarray(input_rows, dtype=np.int64)
        self.n_examples = len(self.input_rows)
        self.target_rows = self.input_rows if target_rows is None else np.asarray(target_rows, dtype=np.int64)
        self.t_col = self._t_tokens = self.t_val = None
        if sp.issparse(targets):  # CSR cells x cCREs: the non-zeros are the positives
            t = sp.csr_matrix(targets, copy=True)
            t.eliminate_zeros()
            self.t_ptr, self.t_col = t.indptr.astype(np.int64), t.indices.astype(np.int64)
            if sr == "mse":
                self.t_val = t.data.astype(np.float32)
        else:  # a cell container (default: the input cells): its sentences are the positives
            src = cells if targets is None else targets
            self.t_ptr, self._t_tokens = np.asarray(src.indptr, dtype=np.int64), src.tokens
            if sr == "mse":
                self.t_val = getattr(src, "tfidf", None)
        if sr == "mse" and self.t_val is None:
            raise ConfigError("the MSE signal reconstruction needs target values (TF-IDF)", field="targets")
        if len(self.target_rows) != self.n_examples:
            raise ConfigError(f"{len(self.target_rows)} targets for {self.n_examples} examples", field="targets")
        self.sr, self.cca, self.k, self.cca_max_pos, self.max_len = sr, bool(cca), int(k), cca_max_pos, max_len
        self.conditions = None if conditions is None else np.asarray(conditions, dtype=np.int64)
        self.condition_key = condition_key
        self.aux_labels = None if aux_labels is None else np.asarray(aux_labels, dtype=np.float32)
        self.weights = {"cca": 1.0, "sr": 1.0, "aux": 0.01, **(weights or {})}
        self.head_prefixes = ((("signal_decoder", "fc1_for_CCA", "layer_norm_for_CCA", "fc2_for_CCA")
                               if heads_at_head_lr else ()) + tuple(new_prefixes))
        self.sr_pos_weight = sr_pos_weight
        self.aux: torch.nn.Linear | None = None

    def setup(self, model) -> None:
        super().setup(model)
        if self.aux_labels is not None and self.aux is None:
            self.aux = torch.nn.Linear(int(model.config.dim), 1)

    def modules(self):
        return [] if self.aux is None else [self.aux]

    def lengths(self):
        return self._padded(self.cells.indptr, self.input_rows)

    def _targets(self, ex: np.ndarray):
        rows = self.target_rows[ex]
        src = self.t_col if self.t_col is not None else self._t_tokens
        if self.t_val is None:
            ptr, col = gather_rows(self.t_ptr, rows, src)
            val = None
        else:
            ptr, (col, val) = gather_rows(self.t_ptr, rows, src, self.t_val)
            val = val.astype(np.float32)
        if self.t_col is None:
            col = col.astype(np.int64) - NUM_SPECIAL
        return ptr, col, val

    def __call__(self, model, rows, ctx):
        from . import rng as krng
        from .objectives import bce_sum, sr_loss_sum, sr_mse_sum, sr_multinomial_sum

        dev = ctx.device
        ids = input_ids(self.cells, self.input_rows[rows], max_input_len(model, self.max_len), train_keys(ctx, rows))
        ids = ids.to(dev)
        kw = {}
        if self.conditions is not None:
            kw[self.condition_key] = torch.from_numpy(np.ascontiguousarray(self.conditions[rows])).to(dev)
        cell = model(ids, **kw).cell_embedding
        ptr, col, val = self._targets(rows)
        prow = torch.from_numpy(np.repeat(np.arange(len(rows)), np.diff(ptr))).to(dev)
        pcol = torch.from_numpy(col).to(dev)
        terms = {}
        if self.cca:
            keys = krng.cell_keys(ctx.seed, ctx.epoch, krng.NEGATIVES, rows)
            qr, qc, ql = cca_queries(ptr, col, model.n_ccres, self.k, keys, self.cca_max_pos)
            # index_select, not cell[qr]: see epiflow.train.pretrain (deterministic backward on CPU)
            q_cell = cell.index_select(0, torch.from_numpy(qr).to(dev))
            lg = model.cca_logits(q_cell, torch.from_numpy(qc + NUM_SPECIAL).to(dev))
            terms["cca"] = bce_sum(lg, torch.from_numpy(ql).to(dev), float(self.k)) / max(len(ql), 1)
        if self.sr is None:
            sig = None
        else:
            sig = model.signal_logits(cell).float()
        if sig is None:
            pass
        elif self.sr == "bce":
            pw = self.sr_pos_weight if self.sr_pos_weight is not None else float(model.pos_weight("SR"))
            terms["sr"] = sr_loss_sum(sig, prow, pcol, pw) / sig.numel()
        elif self.sr == "multinomial":
            terms["sr"] = sr_multinomial_sum(sig, prow, pcol) / len(sig)
        else:
            terms["sr"] = sr_mse_sum(sig, prow, pcol, torch.from_numpy(val).to(dev)) / sig.numel()
        if self.aux is not None:
            y = torch.from_numpy(self.aux_labels[rows]).to(dev)
            terms["aux"] = F.binary_cross_entropy_with_logits(self.aux(cell.float()).squeeze(-1), y)
        return LossOutput(terms, weights=self.weights)


__all__ = ["FitConfig", "LossOutput", "StepContext", "Objective", "fit", "Classification", "Reconstruction",
           "input_ids", "train_keys", "cca_queries", "planned_steps", "epoch_batches", "max_input_len",
           "resolve_device", "autocast", "SR_LOSSES", "predict", "HEADS"]
