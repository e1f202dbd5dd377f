"""Pretraining and fine-tuning of EpiAgent (SPEC §4).

* :func:`pretrain` / :class:`PretrainConfig` - CCA (K schedule) + SR + RLM warm-up on a corpus folder,
  streamed from shards, exact resume, DDP (torchrun), memory-lean mode; CLI ``epiflow pretrain``.
* :func:`finetune` / :class:`FinetuneConfig` - the generic loop the downstream tasks use
  (CCA K=1 + SR, classifier CE / focal, MSE regression of TF-IDF for imputation).
* :mod:`epiflow.train.data` - streaming token-budget batches; :mod:`epiflow.train.sampling` -
  vectorised negatives and RLM replacement; :mod:`epiflow.train.objectives` - the losses.
"""

from .data import BatchConfig, CorpusIndex, PlanConfig, build_index, epoch_plan, make_batch, split_cells
from .objectives import k_for_epoch, sr_loss_sum
from .optim import RowwiseAdamW, inverse_sqrt_lambda, lr_factor, make_scheduler
from .pretrain import PretrainConfig, evaluate_cca, pretrain


def __getattr__(name):  # finetune pulls in more; keep ``import epiflow.train`` light
    if name in ("finetune", "FinetuneConfig", "embed_cells"):
        from . import finetune as _ft

        return getattr(_ft, name)
    raise AttributeError(name)


__all__ = [
    "pretrain", "PretrainConfig", "evaluate_cca", "finetune", "FinetuneConfig", "embed_cells",
    "BatchConfig", "CorpusIndex", "PlanConfig", "build_index", "epoch_plan", "make_batch", "split_cells",
    "k_for_epoch", "sr_loss_sum", "RowwiseAdamW", "inverse_sqrt_lambda", "lr_factor", "make_scheduler",
]
