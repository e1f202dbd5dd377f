"""Derive a fine-tuning model from a pretrained base: :func:`derive`, the one model surgery of the
fine-tuning tasks (annotation, integration, perturbation, zero-shot annotator).

>>> from epiflow.model import derive
>>> clf = derive(base, classes=12, classifier="linear", seed=0)   # cell-type annotation
>>> bc = derive(base, batches=3, seed=0)                          # EpiAgent-BC (integration)
>>> per = derive(base, conditions=1, seed=0)                      # stimulation [PER] token
>>> sup = derive(base, classes=12, pretrain_heads=False)          # authors' supervised layout
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from .config import CLASSIFIERS, NUM_SPECIAL
from .epiagent import EpiAgent

__all__ = ["derive", "token_scale"]


class GeneGraphLike(Protocol):
    """What :func:`derive` reads of a gene graph (:class:`epiflow.genome.gene_graph.GeneGraph`)."""

    @property
    def n_genes(self) -> int: ...

    @property
    def n_edges(self) -> int: ...

    edge_index: np.ndarray  # [2, E] int64 gene indices, row 0 = source (neighbour), row 1 = target
    edge_weight: np.ndarray  # [E] float


def token_scale(model: EpiAgent) -> float:
    """Standard deviation of the model's cCRE input embeddings (the scale of one input token; the
    special-token rows are left out). 1.0 when it is not a positive finite number."""
    w = model.cCRE_embedding.weight.detach()
    s = float(w[NUM_SPECIAL:].float().std()) if w.shape[0] > NUM_SPECIAL + 1 else float(w.float().std())
    return s if math.isfinite(s) and s > 0 else 1.0


def derive(
    base: EpiAgent,
    *,
    classes: int = 0,
    classifier: str | None = None,
    batches: int = 0,
    conditions: int = 0,
    gene_graph: GeneGraphLike | None = None,
    pretrain_heads: bool = True,
    seed: int = 0,
) -> EpiAgent:
    """A new model made of ``base``'s weights plus freshly initialised fine-tuning parts.

    The derived model has ``base``'s configuration (sizes, vocabulary, dropout, conditioning mode,
    attention backend) with exactly these parts on top of the cCRE / rank embeddings and the encoder:

    * ``pretrain_heads``: True keeps the base's pretraining heads (signal decoder, CCA and RLM heads and
      the ``criterion_*`` buffers) when it has them (a base without them stays without); False drops them
      (the authors' supervised layout: encoder + classifier).
    * ``classes`` > 0: a NEW classifier (``classifier.*``) with that many classes; ``classifier`` is
      ``"linear"`` (one Linear layer, cross-entropy) or ``"mlp"`` (the authors' 512-256-128-C head,
      focal loss; the default when ``classes`` is given).
    * ``batches`` > 0: a NEW batch token table (``batch_embedding``, EpiAgent-BC) of that many rows,
      initialised to ZERO so that the derived model starts as the base. Needs the pretraining heads
      (the batch-conditioned model is fine-tuned with signal reconstruction + CCA).
    * ``conditions`` > 0: NEW stimulation [PER] tokens (``condition_embedding``) drawn from
      ``N(0, token_scale(base))``: the token is added to the [CLS] input embedding, so it must be on the
      scale of the base's cCRE embeddings to move the cell embedding at all (a N(0, 0.02) token next to
      N(0, 1) cCRE rows was ignored by fine-tuning).
    * ``gene_graph``: a NEW gene-perturbation GNN (``perturbation_gnn``) with one token per gene of the
      graph (:class:`epiflow.genome.gene_graph.GeneGraph`), PyTorch default initialisation, and the
      graph's edges and weights set (:meth:`~epiflow.model.gnn.PerturbationGNN.set_graph`).

    Anything else the base carries (a classifier, batch / condition tokens, a GNN) is not part of the
    derived model unless requested, and a requested part never takes the base's weights. Every other
    weight and buffer of the derived model is copied from ``base`` (same key, same shape, else
    :class:`~epiflow.errors.CheckpointError`); ``base`` itself is not modified.

    The new parts are initialised from ``seed`` alone: the whole model is built (PyTorch default
    initialisation, or ``config.init``) in a forked CPU random state seeded with ``seed`` and the
    conditional-token draw follows, so the global random state is left as it was. The model is built
    on the CPU in float32 and then moved to ``base``'s device and floating dtype; it is in training
    mode and keeps ``base``'s gradient-checkpointing setting.
    """
    classes, batches, conditions = int(classes), int(batches), int(conditions)
    for name, value in (("classes", classes), ("batches", batches), ("conditions", conditions)):
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}", field=name)
    if classifier is not None and classifier not in CLASSIFIERS:
        raise ConfigError(f"unknown classifier {classifier!r}", field="classifier", fix="use 'linear' or 'mlp'")
    if classifier is not None and not classes:
        raise ConfigError(f"a {classifier!r} classifier needs classes >= 1", field="classes")
    keep_heads = bool(pretrain_heads) and base.config.pretrain_heads
    if batches and not (
        keep_heads
        and getattr(base, "signal_decoder", None) is not None
        and getattr(base, "fc1_for_CCA", None) is not None
    ):
        what = "is derived without" if base.config.pretrain_heads else f"({base.kind}) has no"
        raise ConfigError(
            f"a batch-conditioned model is fine-tuned with the signal decoder / CCA head, but the base {what} them",
            field="batches",
            fix="start from a pretrained EpiAgent checkpoint (pretrained_EpiAgent.pth or epiflow pretrain "
            "output) and keep pretrain_heads=True",
        )

    cfg = base.config.replace(
        pretrain_heads=keep_heads,
        criterion_buffers=base.config.criterion_buffers and keep_heads,
        classifier=(classifier or "mlp") if classes else None,
        num_classes=classes,
        num_batches=batches,
        num_conditions=conditions,
        num_genes=gene_graph.n_genes if gene_graph is not None else 0,
        gnn_edges=gene_graph.n_edges if gene_graph is not None else 0,
    )
    new = tuple(
        prefix
        for prefix, wanted in (
            ("classifier.", classes),
            ("batch_embedding.", batches),
            ("condition_embedding.", conditions),
            ("perturbation_gnn.", gene_graph is not None),
        )
        if wanted
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = EpiAgent.from_config(cfg, backend=base.backend)  # auto: packed while training on CPU
        with torch.no_grad():
            if batches:
                model.batch_embedding.weight.zero_()
            if conditions:
                nn.init.normal_(model.condition_embedding.weight, 0.0, token_scale(base))

    base_sd = base.state_dict()
    copied, bad = {}, []
    for key, value in model.state_dict().items():
        if key.startswith(new):
            continue
        src = base_sd.get(key)
        if src is None:
            bad.append(f"{key} (not in the base)")
        elif src.shape != value.shape:
            bad.append(f"{key} (base {list(src.shape)}, derived {list(value.shape)})")
        else:
            copied[key] = src
    if bad:
        raise CheckpointError(
            f"cannot derive a {cfg.kind} model from this {base.kind} model: {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""),
            fix="derive from a model whose config matches its weights (load it with load_epiagent_checkpoint)",
        )
    model.load_state_dict(copied, strict=False)
    if gene_graph is not None:
        model.perturbation_gnn.set_graph(
            torch.as_tensor(gene_graph.edge_index), torch.as_tensor(gene_graph.edge_weight)
        )
    model.set_gradient_checkpointing(base.EpiAgent_transformer.gradient_checkpointing)
    model.vocab_id = getattr(base, "vocab_id", None)  # the same cCRE vocabulary
    ref = next((p for p in base.parameters() if p.is_floating_point()), None)
    if ref is not None and ref.device.type != "meta":
        model.to(device=ref.device, dtype=ref.dtype)
    return model
