"""The settings of pretraining, :class:`PretrainConfig`: the one declaration of each parameter of
``epiflow pretrain`` (issue #18). Its flags (:func:`epiflow.cliargs.add_config_args`), the workflow's
command line and the ``pretrain`` section of the config schema are made from it. Light: the workflow
imports it while planning."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..cliargs import setting
from ..errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant", "inverse_sqrt")
CCA_NEGATIVES = ("uniform", "df")
SR_OBJECTIVES = ("bce", "multinomial")  # bce = the paper's SR; multinomial = depth-invariant softmax SR (#15)
PRECISIONS = ("auto", "fp32", "bf16")
# attention backends (epiflow.model.attention.BACKENDS) and auto (packed to train on CPU, sdpa to infer;
# flash-attn on CUDA when installed)
BACKENDS = ("auto", "sdpa", "packed", "flash")


@dataclass
class PretrainConfig:
    model_config: str = setting("tiny", "model: preset tiny | small | paper, or a JSON file of EpiAgentConfig")
    model_overrides: dict = setting(default_factory=dict, help="EpiAgentConfig fields to override", cli=False)
    dropout: float | None = setting(None, "override the model's dropout (e.g. 0 for equivalence tests)", min=0,
                                    max=1)
    epochs: int = setting(12, "passes over the corpus", min=1)
    max_steps: int | None = setting(None, "stop after this many optimiser steps", min=1)
    lr: float = setting(1e-4, "peak learning rate (inverse_sqrt: see schedule)", exclusive_min=0)
    schedule: str = setting("cosine", "warm-up + decay (cosine / linear), constant, or the authors' "
                            "inverse_sqrt LambdaLR whose peak is lr / sqrt(warmup)", choices=SCHEDULES)
    warmup: int | None = setting(None, "warm-up steps (default 5 % of the steps, at most 2,000)", min=0)
    min_lr_ratio: float = setting(0.1, "final learning rate / peak (cosine, linear)", min=0, max=1)
    weight_decay: float = setting(0.01, "AdamW weight decay", min=0)
    betas: tuple[float, ...] = setting((0.9, 0.999), "AdamW betas", cli=False)
    eps: float = setting(1e-8, "AdamW eps", cli=False)
    clip_grad: float | None = setting(1.0, "global gradient-norm clip (0 or null: off)", min=0)
    batch_tokens: int = setting(16384, "padded tokens per GPU and micro-batch", min=8)
    max_batch_cells: int | None = setting(None, "cap on cells per GPU and micro-batch", min=1,
                                          aliases=("--max-cells",))
    grad_accum: int = setting(1, "micro-batches per optimiser step", min=1)
    max_len: int | None = setting(None, "sentence cap; longer ones are subsampled at random each step "
                                  "(default min(8190, model max_rank - 2))", min=1)
    k_schedule: tuple[int, ...] = setting((1, 2, 5), "CCA negatives per positive, one value per block of "
                                          "epochs", min=0)
    k_epochs_per_block: int | None = setting(None, "epochs per K block (default epochs / len(k_schedule))", min=1)
    rlm_epochs: int = setting(2, "RLM warm-up epochs", min=0)
    rlm_fraction: float = setting(0.5, "share of the cells given the RLM objective in the warm-up", min=0, max=1,
                                  cli=False)
    sr_pos_weight: float = setting(100.0, "SR BCE weight of the accessible cCREs", cli=False)
    sr_objective: str = setting("bce", "SR loss: bce (the paper: BCE over every cCRE, pos_weight 100) or "
                                "multinomial (softmax over the cCREs, depth-invariant; an option, #15)",
                                choices=SR_OBJECTIVES)
    w_sr: float = setting(1.0, "weight of the SR loss (the paper's sum: 1)", min=0)
    w_cca: float = setting(1.0, "weight of the CCA loss", min=0)
    w_rlm: float = setting(1.0, "weight of the RLM loss", min=0)
    cca_max_pos: int | None = setting(None, "cap on CCA positives per cell (default: all accessible cCREs, as "
                                      "the paper)", min=1)
    cca_negatives: str = setting("uniform", "CCA negatives drawn uniformly from the inaccessible cCREs (the "
                                 "paper) or in proportion to their corpus document frequency (df, #15)",
                                 choices=CCA_NEGATIVES)
    seed: int = setting(0, "random seed (split, batches, initialisation)", min=0)
    eval_fraction: float = setting(0.05, "held-out cells for eval.json", min=0, max=0.99)
    eval_max_cells: int = setting(2000, "held-out cells scored at most", cli=False)
    eval_max_pos: int = setting(2000, "positives per held-out cell scored at most", cli=False)
    ckpt_every: int = setting(1000, "checkpoint every N steps (and at the end; 0: only at the end)", min=0)
    device: str = setting("auto", "auto | cpu | cuda[:i]", pattern=r"auto|cpu|cuda(:[0-9]+)?")
    backend: str = setting("auto", "attention backend", choices=BACKENDS)
    precision: str = setting("auto", "auto: bf16 autocast on GPU, fp32 on CPU", choices=PRECISIONS)
    compile: bool = setting(False, "torch.compile each encoder block (CUDA bf16 varlen attention, or backend sdpa)")
    memory_lean: bool = setting(False, "no table-sized gradients (rebuilt chunk by chunk from per-step "
                                "records), sparse input-token gradients, row-wise AdamW states for the cCRE "
                                "embedding and decoder")
    lean_momentum: bool = setting(False, "memory-lean: keep a bf16 first moment")
    lean_chunk: int = setting(0, "memory-lean: table rows per chunk of the gradient passes (0: by device, 16,384 on "
                              "CPU and 65,536 on CUDA; larger is faster on a GPU, ~6 KB of transient memory a row "
                              "at dim 512)", min=0)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass")
    rlm_separate: bool = setting(False, "RLM epochs: the replaced copies go through the encoder in a forward and "
                                 "backward of their own, after the cells (half the tokens at a time: half the "
                                 "activations; the same gradients, other dropout draws)")
    num_workers: int = setting(0, "data-loader worker processes", min=0)
    window_shards: int = setting(2, "shards shuffled together (streaming window)", min=1)
    bucket_cells: int = setting(1024, "cells per length bucket", cli=False)
    tensorboard: bool = setting(False, "also log to OUT/tensorboard")
    progress: bool = setting(True, "progress bar")
    resume: bool = setting(False, "continue exactly from the training state (OUT/train_state.pt, or in "
                           "--state-dir) if there is one; without --resume a folder holding a state is refused")
    state_dir: str | None = setting(None, "folder of train_state.pt (default: OUT); the workflow keeps it "
                                    "outside its outputs")
    restart_if_changed: bool = setting(False, "with --resume: a state made with other settings is set aside "
                                       "(train_state.pt.previous) and the run starts afresh, instead of an error")

    def validate(self) -> "PretrainConfig":
        from ..cliargs import check_config

        if not self.k_schedule:
            raise ConfigError("k_schedule needs at least one value", field="k_schedule", fix="e.g. 1,2,5")
        check_config(self)
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["k_schedule"] = list(self.k_schedule)
        return d

    # settings that must not change when resuming (they define the data order and the model)
    RESUME_KEYS = ("model_config", "model_overrides", "dropout", "seed", "batch_tokens", "max_batch_cells",
                   "grad_accum", "max_len", "k_schedule", "k_epochs_per_block", "rlm_epochs", "epochs",
                   "cca_negatives", "sr_objective", "rlm_separate",
                   "eval_fraction", "eval_max_cells", "window_shards", "bucket_cells", "memory_lean",
                   "schedule", "lr", "warmup", "max_steps")
