"""Pretraining and fine-tuning of EpiAgent (SPEC §4).

* :func:`pretrain` / :class:`PretrainConfig` - CCA (K schedule) + SR + RLM warm-up on a corpus folder,
  streamed from shards, exact resume, DDP (torchrun), memory-lean mode; CLI ``epiflow pretrain``.
* :func:`finetune.finetune` / :class:`FinetuneConfig` - the generic loop the downstream tasks use
  (CCA K=1 + SR, classifier CE / focal, MSE regression of TF-IDF for imputation).
* :mod:`epiflow.train.data` - streaming token-budget batches; :mod:`epiflow.train.sampling` -
  vectorised negatives and RLM replacement; :mod:`epiflow.train.objectives` - the losses.
"""

import importlib
from typing import Any

from .data import BatchConfig, CorpusIndex, PlanConfig, build_index, epoch_plan, make_batch, split_cells
from .objectives import k_for_epoch, sr_loss_sum
from .optim import RowwiseAdamW, inverse_sqrt_lambda, lr_factor, make_scheduler
from .pretrain import PretrainConfig, evaluate_cca, pretrain


def __getattr__(name: str) -> Any:  # finetune pulls in more; keep ``import epiflow.train`` light
    # (``from . import finetune`` here would recurse: the import looks the name up on this package)
    if name in ("finetune", "FinetuneConfig", "embed_cells"):
        module = importlib.import_module(f"{__name__}.finetune")
        # ``epiflow.train.finetune`` is the submodule (importing it binds that name on the package);
        # its loop is ``epiflow.train.finetune.finetune``
        return module if name == "finetune" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "pretrain", "PretrainConfig", "evaluate_cca", "FinetuneConfig", "embed_cells",
    "BatchConfig", "CorpusIndex", "PlanConfig", "build_index", "epoch_plan", "make_batch", "split_cells",
    "k_for_epoch", "sr_loss_sum", "RowwiseAdamW", "inverse_sqrt_lambda", "lr_factor", "make_scheduler",
]
