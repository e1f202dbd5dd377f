"""Pretraining and fine-tuning of EpiAgent (SPEC §4).

* :func:`pretrain.pretrain` / :class:`PretrainConfig` (:mod:`epiflow.train.config`, light) - CCA (K schedule) + SR + RLM warm-up on a corpus folder,
  streamed from shards, exact resume, DDP (torchrun), memory-lean mode; CLI ``epiflow pretrain``.
* :func:`finetune.finetune` / :class:`FinetuneConfig` - the generic loop the downstream tasks use
  (CCA K=1 + SR, classifier CE / focal, MSE regression of TF-IDF for imputation).
* :mod:`epiflow.train.data` - streaming token-budget batches; :mod:`epiflow.train.sampling` -
  vectorised negatives and RLM replacement; :mod:`epiflow.train.objectives` - the losses.
"""

import importlib
from typing import Any

# names -> submodule, imported on first use: ``import epiflow.train`` (and ``epiflow.train.config``, which
# the workflow reads while planning) stays light (no torch)
_LAZY = {
    "BatchConfig": "data", "CorpusIndex": "data", "PlanConfig": "data", "build_index": "data",
    "epoch_plan": "data", "make_batch": "data", "split_cells": "data", "k_for_epoch": "objectives",
    "sr_loss_sum": "objectives", "RowwiseAdamW": "optim", "inverse_sqrt_lambda": "optim", "lr_factor": "optim",
    "make_scheduler": "optim", "PretrainConfig": "config", "evaluate_cca": "pretrain",
    "FinetuneConfig": "finetune", "embed_cells": "finetune",
}


def __getattr__(name: str) -> Any:
    # ``epiflow.train.finetune`` / ``.pretrain`` are submodules (importing one binds that name on the
    # package); the loops are ``epiflow.train.finetune.finetune`` / ``epiflow.train.pretrain.pretrain``
    if name in ("finetune", "pretrain"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PretrainConfig", "evaluate_cca", "FinetuneConfig", "embed_cells",
    "BatchConfig", "CorpusIndex", "PlanConfig", "build_index", "epoch_plan", "make_batch", "split_cells",
    "k_for_epoch", "sr_loss_sum", "RowwiseAdamW", "inverse_sqrt_lambda", "lr_factor", "make_scheduler",
]
