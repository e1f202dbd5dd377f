"""Pretraining (SPEC §4): CCA with the K schedule + SR + RLM warm-up, streamed from corpus shards.

``pretrain(corpus_dir, out_dir, PretrainConfig(...))`` writes into ``out_dir``:

* ``checkpoint.pth`` (+ ``checkpoint.pth.json``): the model in the authors' key format;
* ``model_config.json``: sizes, ``num_heads``, the corpus ``vocab_id``;
* ``train_state.pt`` (in ``state_dir`` when given): model, optimiser(s), scheduler, RNG states, data
  position (step), config and its hash, ``metrics.csv`` so far; an existing one is refused without
  ``resume`` (see :mod:`epiflow.train.resume`);
* ``metrics.csv`` (+ ``tensorboard/``), ``loss.png``; ``eval.json``: held-out CCA AUROC.

Exact resume: batches are a pure function of (seed, step) (see :mod:`epiflow.train.data`), dropout
is re-seeded from (seed, step, rank) at every step, and the optimiser/scheduler states are restored,
so a run killed after a checkpoint and resumed ends with bit-identical weights (on the same hardware
and thread settings; checked on CPU with 1 and 2 threads: the one op that made 2-thread runs differ,
the backward of ``cell[q_cell]``, a parallel atomic ``index_put_``, is now an ``index_select``).
The training state, its resume rules and stop signals: :mod:`epiflow.train.resume`.

Losses are sums divided by denominators over the whole optimiser step (all ranks and accumulation
micro-batches; :func:`epiflow.train.data.step_normalizers`), so one process with a whole batch and
N processes with a part each compute the same update.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from ..cliargs import legacy_keys
from ..errors import CheckpointError, ConfigError
from ..io import atomic_path, atomic_write_text, removed_if_left_empty
from . import distributed as D
from . import resume as R
from .data import (
    BatchConfig,
    CorpusIndex,
    MicroBatchStream,
    PlanConfig,
    ShardCache,
    build_index,
    epoch_plan,
    loader,
    make_batch,
    split_cells,
    step_normalizers,
)
from .lean import LeanTables
from .metrics import MetricsLogger, StepProfiler, peak_memory_mb, plot_losses
from .objectives import bce_sum, k_for_epoch, pos_rows_cols, sr_loss_sum, sr_multinomial_sum, sr_norm_key
from .config import CCA_NEGATIVES, PretrainConfig  # noqa: F401 (CCA_NEGATIVES: re-exported)
from .optim import make_adamw, make_scheduler
from .rng import mix64

if TYPE_CHECKING:
    from ..model import EpiAgent

log = logging.getLogger(__name__)

STATE_FORMAT = "epiflow-train-state"


# ----------------------------------------------------------------------------- model building
def build_model_config(spec: str, n_ccres: int, overrides: dict | None = None, dropout: float | None = None):
    from ..model import PRESETS, EpiAgentConfig

    overrides = dict(overrides or {})
    if dropout is not None:
        overrides["dropout"] = float(dropout)
    if spec in PRESETS:
        return EpiAgentConfig.preset(spec, n_ccres=n_ccres, **overrides)
    p = Path(spec)
    if not p.exists():
        raise ConfigError(f"unknown model config {spec!r}", field="model_config",
                          fix=f"use a preset ({', '.join(PRESETS)}) or a JSON file of EpiAgentConfig fields")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid JSON ({exc.msg})", path=str(p), line=exc.lineno) from None
    if not isinstance(d, dict) or not isinstance(d.get("config", d), dict):
        raise ConfigError("a model config must be a JSON object of EpiAgentConfig fields", path=str(p),
                          fix='write {"dim": 64, "num_layers": 2, ...} (or use a preset)')
    d = dict(d.get("config", d))
    # what pretrain's model_config.json and a checkpoint's .json side file hold besides the model fields
    for k in ("vocab_id", "corpus", "format", "version", "backend"):
        d.pop(k, None)
    EpiAgentConfig.check_fields(d, path=str(p))
    if int(d.get("n_ccres", n_ccres)) != int(n_ccres):
        raise ConfigError(f"model config has n_ccres {d['n_ccres']} but the corpus has {n_ccres}",
                          path=str(p), field="n_ccres", fix="drop n_ccres from the file; it comes from the corpus")
    d["n_ccres"] = int(n_ccres)
    d.update(overrides)
    return EpiAgentConfig.from_dict(d)


PARTS = ("all", "main", "rlm")


class PretrainObjective(nn.Module):
    """Wraps the model so that one ``forward`` computes every loss term (what DDP needs: all heads run
    inside the wrapped forward). Returns the weighted loss already divided by the step denominators
    and multiplied by ``world_size`` (DDP averages gradients), plus the raw sums for logging."""

    def __init__(self, model, lean: LeanTables | None = None, sr_objective: str = "bce"):
        super().__init__()
        self.model = model
        self.lean = lean
        self.sr_objective = sr_objective

    def forward(self, batch: dict, k: int, norms: dict, weights: tuple, world: int, sr_pos_weight: float,
                autocast_dtype=None, part: str = "all"):
        """``part``: ``all`` (the cells and their RLM copies in one forward), ``main`` (the cells: SR and
        CCA) or ``rlm`` (the RLM copies only): ``main`` then ``rlm``, each with its own backward, is the
        same gradient as ``all`` with half the tokens in the encoder at a time (``rlm_separate``)."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        model = self.model
        dev = next(model.parameters()).device
        ids = batch["input_ids"].to(dev, non_blocking=True)
        do_main = part != "rlm"
        do_rlm = "rlm_input_ids" in batch and part != "main"
        seqs = ([ids] if do_main else []) + ([batch["rlm_input_ids"].to(dev, non_blocking=True)] if do_rlm else [])
        if not seqs:
            raise ValueError("part 'rlm' of a micro-batch without RLM copies")
        B = ids.shape[0] if do_main else 0
        inp = torch.cat(seqs, 0) if len(seqs) > 1 else seqs[0]
        with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(inp)
            cell = out.cell_embedding[:B]
            q_cell = batch["cca_cell"].to(dev, non_blocking=True)
            if self.lean is None and do_main:  # index_select, not cell[q_cell]: the backward of advanced
                # indexing with repeated rows is a parallel atomic index_put_ on CPU (run-to-run float
                # differences with >= 2 threads); index_select's backward (index_add_) sums in a fixed order
                cca_logits = model.cca_logits(cell.index_select(0, q_cell), batch["cca_ids"].to(dev, non_blocking=True))
            rlm_logits = None
            if do_rlm:
                hid = out.hidden[B:]
                rlm_logits = model.rlm_logits(hid[inp[B:] > 3])
            if self.lean is None and do_main:
                sig = model.signal_logits(cell)
        w_sr, w_cca, w_rlm = weights
        loss = sr = cca = rl = torch.zeros((), device=dev)
        if do_main:
            rows, cols = pos_rows_cols(batch["pos_ptr"].to(dev), batch["pos_ccre"].to(dev, non_blocking=True))
            if self.sr_objective == "multinomial":
                if self.lean is None:
                    sr = sr_multinomial_sum(sig, rows, cols)
                else:
                    sr = self.lean.sr_multinomial_sum(cell.float(), rows, cols)
            elif self.lean is None:
                sr = sr_loss_sum(sig, rows, cols, sr_pos_weight)
            else:
                sr = self.lean.sr_loss_sum(cell.float(), rows, cols, sr_pos_weight)
            if self.lean is None:
                cca = bce_sum(cca_logits, batch["cca_label"].to(dev), pos_weight=float(k))
            else:  # the queried embedding rows get their gradient at the step (lean.py)
                cca = self.lean.cca_loss_sum(cell, q_cell, batch["cca_ids"].to(dev, non_blocking=True),
                                             batch["cca_label"].to(dev), float(k), autocast_dtype)
            loss = w_sr * sr / norms[sr_norm_key(self.sr_objective)] + w_cca * cca / max(norms["cca"], 1.0)
        if do_rlm:
            assert rlm_logits is not None
            rl = bce_sum(rlm_logits, batch["rlm_label"].to(dev), pos_weight=1.0)
            loss = loss + w_rlm * rl / max(norms["rlm"], 1.0)
        return loss * world, torch.stack([t.detach().float() for t in (sr, cca, rl)])


# ----------------------------------------------------------------------------- helpers
def _step_seed(seed: int, step: int, rank: int) -> int:
    with np.errstate(over="ignore"):
        x = mix64(np.uint64(seed) ^ mix64(np.uint64(step) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(rank)))
    return int(x & np.uint64(0x7FFFFFFFFFFFFFFF))


def _rng_states(device) -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_states(st: dict, device) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _autocast_dtype(cfg: PretrainConfig, device):
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


def _check_compile(cfg: PretrainConfig, device) -> None:
    """``compile`` compiles the encoder blocks (``EpiAgent.compile_blocks``). They compile to one graph
    on the padded sdpa path and on CUDA's varlen flash path (bf16); the per-sequence packed attention
    (CPU, fp32) loops over each batch's lengths, so its blocks would recompile at every batch: refused."""
    from ..model.attention import packed_kernel_for, resolve_backend

    backend = resolve_backend(cfg.backend, device, training=True)
    dtype = _autocast_dtype(cfg, device) or torch.float32
    if backend == "packed" and packed_kernel_for(device, dtype) != "flash-varlen":
        where = f"on {device.type} in {str(dtype).replace('torch.', '')}"
        if device.type == "cuda" and dtype != torch.float32:
            where += " (EPIFLOW_PACKED_PER_SEQUENCE or EPIFLOW_SDPA_CUDNN is set, or the GPU is older than sm80)"
        raise ConfigError(f"compile needs the varlen flash attention kernel (CUDA, bf16); the packed attention "
                          f"{where} runs one call per sequence and would recompile at every batch",
                          field="compile", fix="drop --compile, or use --backend sdpa (padded batches), or train "
                                               "on CUDA in bf16")


def _cell_lengths(index, uids):
    return index.lengths[np.asarray(uids, dtype=np.int64)]


def _corpus_df(corpus_dir: Path, n_ccres: int):
    """The corpus document frequencies (None when absent or of another size: the eval then skips the
    popularity-only AUROC)."""
    try:
        df = np.load(Path(corpus_dir) / "df.npy")
    except (OSError, ValueError):
        return None
    return df if df.ndim == 1 and len(df) == n_ccres else None


def _negative_weights(cfg: PretrainConfig, corpus_dir: Path, n_ccres: int):
    """Sampling weights of the CCA negatives: None (uniform, the paper) or the corpus df (``df``)."""
    if cfg.cca_negatives == "uniform":
        return None
    path = Path(corpus_dir) / "df.npy"
    try:
        df = np.load(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cca_negatives 'df' needs the corpus document frequencies ({exc})", path=str(path),
                          field="cca_negatives", fix="rebuild the corpus, or use cca_negatives uniform") from None
    df = np.asarray(df, dtype=np.float64).ravel()
    if len(df) != n_ccres or not np.all(np.isfinite(df)) or (df < 0).any() or df.sum() <= 0:
        raise ConfigError(f"the corpus df has {len(df)} values (corpus: {n_ccres} cCREs) or invalid entries",
                          path=str(path), field="cca_negatives", fix="rebuild the corpus")
    return df


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_cca(model: EpiAgent, index: CorpusIndex, uids: np.ndarray, *, max_len: int, seed: int,
                 batch_tokens: int = 16384, max_pos: int | None = 2000, device: str | torch.device | None = None,
                 max_cells: int | None = None, df: np.ndarray | None = None) -> dict:
    """Held-out CCA AUROC: each cell's accessible cCREs (top ``max_pos`` by TF-IDF) versus as many
    inaccessible cCREs sampled uniformly (K = 1), scored by the CCA head on the cell's zero-shot
    embedding (top-``max_len`` input); ``sklearn.metrics.roc_auc_score`` over all queries pooled.

    With ``df`` (the corpus document frequencies) also ``cca_auroc_df_only``: the AUROC of the
    cell-independent score "df of the queried cCRE" on the same queries. Popular cCREs are both more
    often accessible and rarely drawn as uniform negatives, so this alone reaches ~0.85 on real data
    (issue #15); only the excess of ``cca_auroc`` over it comes from the cell embedding."""
    from sklearn.metrics import roc_auc_score

    uids = np.asarray(uids, dtype=np.int64)
    if len(uids) == 0:
        return {"cca_auroc": float("nan"), "n_cells": 0, "n_queries": 0}
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    cache = ShardCache(index, capacity=4)
    bcfg = BatchConfig(n_ccres=index.n_ccres, max_len=max_len, k=1, rlm=False, seed=seed, cca_max_pos=max_pos)
    order = uids[np.argsort(index.lengths[uids], kind="stable")]
    padded = np.minimum(index.lengths[order], max_len) + 2
    from .data import _cut_budget

    cuts = _cut_budget(padded, int(batch_tokens), 1, max_cells)
    logits, labels, ids = [], [], []
    for a, b_ in zip(cuts[:-1], cuts[1:]):
        b = make_batch(cache, order[a:b_], 0, bcfg, train=False)
        out = model(b["input_ids"].to(device))
        lg = model.cca_logits(out.cell_embedding[b["cca_cell"].to(device)].float(),
                              b["cca_ids"].to(device)).float().cpu().numpy()
        logits.append(lg)
        labels.append(b["cca_label"].numpy())
        ids.append(b["cca_ids"].numpy())
    model.train(was_training)
    y = np.concatenate(labels)
    x = np.concatenate(logits)
    ok = 0 < y.sum() < len(y)
    auc = float(roc_auc_score(y, x)) if ok else float("nan")
    out = {"cca_auroc": auc, "n_cells": int(len(uids)), "n_queries": int(len(y)), "positives": int(y.sum())}
    if df is not None:
        q = np.concatenate(ids) - 4
        out["cca_auroc_df_only"] = float(roc_auc_score(y, np.asarray(df, dtype=np.float64)[q])) if ok else float("nan")
    return out


# ----------------------------------------------------------------------------- the run
def pretrain(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, config: PretrainConfig | None = None,
             **kw: Any) -> dict:
    """Pretrain EpiAgent on a corpus folder; returns a summary dict (also in ``summary.json``)."""
    cfg = dataclasses.replace(config, **kw) if config is not None else PretrainConfig(**kw)
    cfg.validate()
    out_dir = Path(out_dir)
    info = D.init(cfg.device)
    try:
        # an error before training starts (a bad model config, a corrupt corpus) leaves no empty out_dir
        with removed_if_left_empty(out_dir), R.StopSignals() as stop:
            # SIGUSR1/SIGTERM (e.g. a SLURM time limit): save, then stop
            return _pretrain(Path(corpus_dir), out_dir, cfg, info, stop)
    finally:
        D.shutdown(info)


def _pretrain(corpus_dir: Path, out_dir: Path, cfg: PretrainConfig, info: D.DistInfo,
              stop: R.StopSignals | None = None) -> dict:
    from ..model import from_config

    dev = info.device
    if cfg.compile:
        _check_compile(cfg, dev)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    D.barrier(info)
    state_path = R.state_path(out_dir, cfg.state_dir)
    if info.is_main:
        R.clean_stale_temps(out_dir, state_path.parent)
    index = build_index(corpus_dir)
    mcfg = build_model_config(cfg.model_config, index.n_ccres, cfg.model_overrides, cfg.dropout)
    if cfg.max_len is None:
        cfg = dataclasses.replace(cfg, max_len=min(8190, mcfg.max_rank - 2))
    assert cfg.max_len is not None
    if mcfg.max_rank < cfg.max_len + 2:
        raise ConfigError(f"max_len {cfg.max_len} (+ CLS/SEP) exceeds the model's {mcfg.max_rank} rank embeddings",
                          field="max_len", fix=f"use --max-len {mcfg.max_rank - 2} or a larger model")
    # an existing state: refused without --resume, checked against these settings (before any work)
    load_state = R.prepare_state(state_path, cfg.to_dict(), PretrainConfig.RESUME_KEYS, resume=cfg.resume,
                                 restart_if_changed=cfg.restart_if_changed, may_move=info.is_main,
                                 data={"n_ccres": index.n_ccres, "vocab_id": index.vocab_id,
                                       "n_cells": index.n_cells}, former=legacy_keys(PretrainConfig))
    D.barrier(info)
    train_uids, eval_uids = split_cells(index.n_cells, cfg.eval_fraction, cfg.seed, cfg.eval_max_cells)
    plan_cfg = PlanConfig(batch_tokens=cfg.batch_tokens, world_size=info.world_size, max_len=cfg.max_len,
                          window_shards=cfg.window_shards, bucket_cells=cfg.bucket_cells, seed=cfg.seed,
                          max_cells=cfg.max_batch_cells)
    # steps of every epoch (plans depend only on shard lengths; cheap)
    steps_per_epoch = [len(epoch_plan(index, train_uids, e, plan_cfg)) // cfg.grad_accum
                       for e in range(cfg.epochs)]
    total_steps = int(sum(steps_per_epoch))
    if cfg.max_steps is not None:
        total_steps = min(total_steps, int(cfg.max_steps))
    if total_steps < 1:
        raise ConfigError(f"no optimiser step fits: {len(train_uids)} training cells, batch_tokens "
                          f"{cfg.batch_tokens} x {info.world_size} ranks, grad_accum {cfg.grad_accum}",
                          field="batch_tokens", fix="lower --batch-tokens / --grad-accum or use more cells")
    warmup = cfg.warmup if cfg.warmup is not None else min(2000, max(1, int(0.05 * total_steps)))

    torch.manual_seed(cfg.seed)
    model = from_config(mcfg, backend="sdpa")
    model.vocab_id = index.vocab_id or None  # saved in the checkpoint's side file
    model.to(dev)
    model.set_backend(cfg.backend)
    if cfg.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    model.train()

    lean = None
    named = list(model.named_parameters())
    if cfg.memory_lean and not mcfg.pretrain_heads:
        raise ConfigError("memory-lean mode needs the pretraining heads", field="memory_lean")
    opt = make_adamw([(n, p) for n, p in named if not (cfg.memory_lean and n in
                      ("cCRE_embedding.weight", "signal_decoder.weight"))],
                     cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, fused=(dev.type == "cuda"))
    if cfg.memory_lean:
        lean = LeanTables(model, opt, cfg.weight_decay, cfg.betas, cfg.eps, momentum=cfg.lean_momentum,
                          chunk=cfg.lean_chunk)
    sched = make_scheduler(opt, cfg.schedule, warmup, total_steps, cfg.min_lr_ratio)

    step = 0
    if load_state:
        step = _load_state(state_path, cfg, model, opt, sched, lean, dev, index, out_dir=out_dir,
                           restore_metrics=info.is_main)
        log.info("resuming from step %d of %d (%s)", step, total_steps, state_path)

    objective = PretrainObjective(model, lean, cfg.sr_objective)
    runner: Any = objective  # the objective, or its DDP wrapper
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if lean is not None:
            DDP._set_params_and_buffers_to_ignore_for_model(
                objective, ["model." + n for n in lean.param_names()])
        runner = DDP(objective, device_ids=[dev.index] if dev.type == "cuda" else None,
                     find_unused_parameters=True, gradient_as_bucket_view=lean is not None)
    if cfg.compile:
        model.compile_blocks()

    if info.is_main:
        atomic_write_text(out_dir / "model_config.json", json.dumps(
            {**mcfg.to_dict(), "num_heads": mcfg.num_heads, "vocab_id": index.vocab_id,
             "corpus": str(corpus_dir)}, indent=2))
    metrics = MetricsLogger(out_dir, enabled=info.is_main, tensorboard=cfg.tensorboard,
                            resume_step=step if load_state else None)
    autocast_dtype = _autocast_dtype(cfg, dev)
    weights = (cfg.w_sr, cfg.w_cca, cfg.w_rlm)
    n_blocks = cfg.k_epochs_per_block
    neg_weights = _negative_weights(cfg, corpus_dir, index.n_ccres)

    pbar = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)
    delay = float(os.environ.get("EPIFLOW_TRAIN_STEP_DELAY", "0") or 0)  # test hook (kill mid-run)
    profiler = StepProfiler(out_dir, info.is_main, dev)  # EPIFLOW_PROFILE_STEPS (off by default)
    last = {}
    epoch_start = 0
    t_run = time.time()
    for epoch in range(cfg.epochs):
        n_steps = steps_per_epoch[epoch]
        if step >= epoch_start + n_steps or step >= total_steps:
            epoch_start += n_steps
            if step >= total_steps:
                break
            continue
        k = k_for_epoch(epoch, cfg.k_schedule, n_blocks, cfg.epochs)
        rlm = epoch < cfg.rlm_epochs
        crit_cca = getattr(model, "criterion_CCA", None)
        if crit_cca is not None:
            crit_cca.pos_weight.fill_(float(k))
        plan = epoch_plan(index, train_uids, epoch, plan_cfg)
        first = (step - epoch_start) * cfg.grad_accum
        last_micro = min(n_steps, total_steps - epoch_start) * cfg.grad_accum
        bcfg = BatchConfig(n_ccres=index.n_ccres, max_len=cfg.max_len, k=k, rlm=rlm,
                           rlm_fraction=cfg.rlm_fraction, seed=cfg.seed, cca_max_pos=cfg.cca_max_pos,
                           neg_weights=neg_weights)
        stream = MicroBatchStream(index, plan, epoch, first, info.rank, info.world_size, bcfg,
                                  cache_shards=cfg.window_shards + 1, stop=last_micro)
        it = iter(loader(stream, cfg.num_workers, pin_memory=(dev.type == "cuda")))
        while step < epoch_start + n_steps and step < total_steps:
            profiler.before(step + 1)
            t0 = time.time()
            torch.manual_seed(_step_seed(cfg.seed, step, info.rank))
            m0 = (step - epoch_start) * cfg.grad_accum
            step_cells = np.concatenate(plan[m0:m0 + cfg.grad_accum])
            norms = step_normalizers(_cell_lengths(index, step_cells), index.n_ccres, k, cfg.max_len, rlm,
                                     cfg.cca_max_pos)
            terms = torch.zeros(3, device=dev)
            n_tok = 0
            for a in range(cfg.grad_accum):
                batch = next(it)
                assert int(batch["micro_index"]) == m0 + a, "data stream out of order"
                # rlm_separate: the cells, then their RLM copies, each with its own forward and backward
                parts = ("main", "rlm") if (cfg.rlm_separate and "rlm_input_ids" in batch) else ("all",)
                for i, part in enumerate(parts):
                    sync = (a == cfg.grad_accum - 1 and i == len(parts) - 1) or not info.enabled
                    ctx = runner.no_sync() if (info.enabled and not sync) else _nullctx()
                    with ctx:
                        loss, t = runner(batch, k, norms, weights, info.world_size, cfg.sr_pos_weight,
                                         autocast_dtype, part)
                        loss.backward()
                    terms += t
                n_tok += int(batch["n_input_tokens"])
            if lean is not None:
                lean.sync(info.world_size)
            gnorm = _clip(model, lean, cfg.clip_grad)
            if lean is not None:  # before opt.step(): it rebuilds gradients with the pre-update heads
                lean.step()
            opt.step()
            lr_now = opt.param_groups[0]["lr"]
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            # logging (global sums)
            stats = torch.cat([terms, torch.tensor([float(n_tok)], device=dev)])
            D.all_reduce_sum(stats, info)
            sr_m = float(stats[0]) / norms[sr_norm_key(cfg.sr_objective)]
            cca_m = float(stats[1]) / max(norms["cca"], 1.0)
            rlm_m = float(stats[2]) / max(norms["rlm"], 1.0) if rlm else 0.0
            dt = time.time() - t0
            last = {"step": step, "epoch": epoch + 1, "k": k, "rlm": int(rlm),
                    "loss": cfg.w_sr * sr_m + cfg.w_cca * cca_m + cfg.w_rlm * rlm_m,
                    "sr": sr_m, "cca": cca_m, "rlm_loss": rlm_m if rlm else "", "lr": lr_now,
                    "grad_norm": gnorm, "cells": int(norms["cells"]), "tokens": int(stats[3]),
                    "tokens_per_s": float(stats[3]) / max(dt, 1e-9), "step_s": dt,
                    "mem_mb": peak_memory_mb(dev)}
            if not math.isfinite(last["loss"]):
                raise ConfigError(f"loss is not finite at step {step} ({last})", field="lr",
                                  fix="lower --lr or raise --warmup")
            metrics.log(last)
            profiler.after(step)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{last['loss']:.4f}", cca=f"{cca_m:.3f}", lr=f"{lr_now:.2e}")
            if cfg.ckpt_every and step % int(cfg.ckpt_every) == 0 and step < total_steps:
                _save_all(out_dir, cfg, model, opt, sched, lean, step, info, index)
            if stop is not None and step < total_steps and R.stop_requested(stop, info):
                _save_all(out_dir, cfg, model, opt, sched, lean, step, info, index)
                raise R.TrainingInterrupted(stop.signum, step, state_path)
            if delay:
                time.sleep(delay)
        del it
        epoch_start += n_steps
        if step >= total_steps:
            break
    if pbar is not None:
        pbar.close()
    profiler.after(step, final=True)  # a run shorter than the profiled range
    _save_all(out_dir, cfg, model, opt, sched, lean, step, info, index)
    metrics.close()
    summary = {"steps": step, "total_steps": total_steps, "epochs": cfg.epochs,
               "steps_per_epoch": steps_per_epoch, "world_size": info.world_size,
               "n_train_cells": int(len(train_uids)), "n_eval_cells": int(len(eval_uids)),
               "wall_s": time.time() - t_run, "last": last, "device": str(dev),
               "peak_mem_mb": peak_memory_mb(dev), "memory_lean": cfg.memory_lean,
               "lean_peak_store_mb": None if lean is None else lean.peak_store_bytes / 2**20}
    if info.is_main:
        ev = evaluate_cca(model, index, eval_uids, max_len=cfg.max_len, seed=cfg.seed,
                          batch_tokens=cfg.batch_tokens, max_pos=cfg.eval_max_pos, device=dev,
                          df=_corpus_df(corpus_dir, index.n_ccres))
        atomic_write_text(out_dir / "eval.json", json.dumps(ev, indent=2))
        summary["eval"] = ev
        try:
            plot_losses(out_dir / "metrics.csv", out_dir / "loss.png")
        except Exception as exc:  # a figure must never fail a finished run
            log.warning("could not draw loss.png: %s", exc)
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    D.barrier(info)
    return summary


def info_world(_model=None) -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _clip(model, lean, max_norm) -> float:
    dense = [p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse]
    sq = torch.zeros((), device=next(model.parameters()).device)
    if dense:  # one multi-tensor kernel per device and dtype, not three ops per parameter
        sq = sq + torch.stack([n.float() for n in torch._foreach_norm([p.grad for p in dense])]).pow(2).sum()
    sparse = [p for p in model.parameters() if p.grad is not None and p.grad.is_sparse]
    if lean is not None:
        sq = sq + lean.sq_norm()
    else:
        for p in sparse:
            sq = sq + p.grad.coalesce().values().float().pow(2).sum()
    norm = float(sq.sqrt())
    if max_norm and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        if dense:
            torch._foreach_mul_([p.grad for p in dense], coef)
        if lean is not None:
            lean.scale_(coef)
    return norm


# ----------------------------------------------------------------------------- checkpoints
def _save_all(out_dir, cfg, model, opt, sched, lean, step, info, index) -> None:
    if not info.is_main:
        D.barrier(info)
        return
    state = {
        "format": STATE_FORMAT, "version": 1, "step": int(step),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "lean": None if lean is None else lean.state_dict(),
        "rng": _rng_states(info.device), "config": cfg.to_dict(),
        "world_size": info.world_size, "n_ccres": index.n_ccres, "vocab_id": index.vocab_id,
        "n_cells": int(index.n_cells),
        "data_position": {"step": int(step), "micro_batch": int(step) * cfg.grad_accum},
    }
    state["config_hash"] = R.config_hash(state["config"], PretrainConfig.RESUME_KEYS)
    state["metrics_csv"] = R.metrics_text(out_dir)  # Snakemake may delete metrics.csv of a killed job
    with atomic_path(R.state_path(out_dir, cfg.state_dir)) as tmp:
        torch.save(state, tmp)
    model.save_epiagent_checkpoint(out_dir / "checkpoint.pth", write_config=True)
    log.info("checkpoint at step %d -> %s", step, out_dir)
    D.barrier(info)


def _load_state(path, cfg, model, opt, sched, lean, dev, index, *, out_dir=None, restore_metrics=False) -> int:
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read the training state ({exc})", path=str(path),
                              fix="delete it to start from scratch, or restore a complete copy") from None
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        raise CheckpointError("not an epiflow training state", path=str(path), fix="point --out at a pretraining folder")
    if int(st["n_ccres"]) != index.n_ccres or st.get("vocab_id", "") != index.vocab_id:
        raise CheckpointError(f"the training state was made on another corpus vocabulary "
                              f"({st['n_ccres']} cCREs, vocab_id {st.get('vocab_id')!r})", path=str(path),
                              fix="resume with the same --corpus, or use a new --out folder")
    if int(st.get("world_size", 1)) != info_world(model):
        log.warning("resuming with %d ranks instead of %d: batches are regrouped, the run is no longer "
                    "identical to an uninterrupted one", info_world(model), st.get("world_size"))
    old = R.renamed_settings(st["config"], legacy_keys(PretrainConfig))  # a state from before a rename
    new = cfg.to_dict()
    defaults = PretrainConfig().to_dict()  # states written before a key existed had its default
    diff = [k for k in PretrainConfig.RESUME_KEYS if old.get(k, defaults.get(k)) != new.get(k)]
    if diff:
        raise CheckpointError("cannot resume exactly: settings differ from the interrupted run: "
                              + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff),
                              path=str(path), fix="resume with the original settings (see its config)")
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    if lean is not None:
        lean.load_state_dict(st["lean"])
    _set_rng_states(st["rng"], dev)
    if restore_metrics and out_dir is not None:
        R.restore_metrics(out_dir, st, int(st["step"]))
    return int(st["step"])
