"""Token-budget fine-tuning on the engine (SPEC §5): ``finetune(model, data, objectives=(...))``.

A thin front end of :func:`epiflow.train.engine.fit` that trains ``model`` in place on the cells of
``data`` (a corpus folder, a :class:`~epiflow.corpus.shard.Shard`, shard paths, or a list of those)
with token-budget batches, a cosine schedule with 5 % warm-up, and

* ``"cca"``  - cell-cCRE alignment, K negatives per positive (default K = 1, pos_weight = K);
* ``"sr"``   - signal reconstruction, BCE with pos_weight 100 (or ``sr_objective="multinomial"``);
* ``"classify"`` - classifier on the cell embedding (alone): cross-entropy (``linear`` head) or the
  authors' focal loss (``mlp`` head), labels from ``labels``;
* ``"mse"``  - the imputation variant: CCA as BCE (as pretraining) and SR as **MSE regression of
  the TF-IDF values** (0 for inaccessible cCREs).

``embed_cells`` gives the zero-shot (or fine-tuned) embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..corpus.shard import Shard
from ..errors import ConfigError
from ..tokenize import NUM_SPECIAL
from .objectives import SR_OBJECTIVES

if TYPE_CHECKING:
    from ..model import EpiAgent

log = logging.getLogger(__name__)

OBJECTIVES = ("cca", "sr", "classify", "mse")


@dataclass
class FinetuneConfig:
    objectives: tuple = ("cca", "sr")
    epochs: int = 5
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup: int | None = None        # default: 5 % of the steps
    weight_decay: float = 0.01
    clip_grad: float | None = 1.0
    batch_tokens: int = 16384
    max_len: int | None = None
    k: int = 1
    sr_pos_weight: float = 100.0
    sr_objective: str = "bce"        # bce (the paper) | multinomial (depth-invariant; see train.objectives)
    weights: dict | None = None      # per-objective loss weights
    seed: int = 0
    device: str | None = None
    progress: bool = True


def finetune(model, data, objectives=("cca", "sr"), *, labels=None, cells=None, batch_ids=None,
             config: FinetuneConfig | None = None, **kw) -> dict:
    """Fine-tune ``model`` in place with :func:`epiflow.train.engine.fit` (token-budget batches, cosine
    schedule with 5 % warm-up); returns ``{"history": [per-epoch mean losses], "steps": n, "log":
    per-step DataFrame}``.

    ``cells``: indices of the cells of ``data`` to train on (default all); ``labels``: class index per
    cell of ``data`` (for ``"classify"``); ``batch_ids``: conditional batch token per cell (-1 = none).
    ``"classify"`` trains alone; ``"cca"`` / ``"sr"`` / ``"mse"`` combine into one reconstruction
    objective (``"mse"``: CCA as BCE and SR as MSE of the TF-IDF values).
    """
    from .engine import Classification, FitConfig, Objective, Reconstruction, fit

    cfg = config or FinetuneConfig()
    if kw:
        import dataclasses

        cfg = dataclasses.replace(cfg, **kw)
    objectives = tuple(objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise ConfigError(f"unknown fine-tuning objective(s) {bad or objectives}", field="objectives",
                          fix=f"choose from {', '.join(OBJECTIVES)}")
    if "classify" in objectives and len(objectives) > 1:
        raise ConfigError(f"'classify' trains alone, not with {[o for o in objectives if o != 'classify']}",
                          field="objectives", fix="run the reconstruction objectives and the classifier one after "
                                                  "the other")
    if cfg.sr_objective not in SR_OBJECTIVES:
        raise ConfigError(f"unknown SR objective {cfg.sr_objective!r}", field="sr_objective",
                          fix="use bce (the paper) or multinomial")
    cs = Shard.from_any(data)
    if cs.n_cells == 0:
        raise ConfigError("no cells to fine-tune on", field="data")
    if model.config.n_ccres != cs.n_ccres:
        from ..errors import VocabularyMismatchError

        raise VocabularyMismatchError(f"the model has {model.config.n_ccres} cCREs but the data has {cs.n_ccres}",
                                      field="data", fix="fine-tune on data tokenized with the model's vocabulary")
    rows = np.arange(cs.n_cells) if cells is None else np.asarray(cells, dtype=np.int64)
    max_len = cfg.max_len or min(8190, model.config.max_rank - 2)
    w = {"cca": 1.0, "sr": 1.0, "classify": 1.0, "mse": 1.0, **(cfg.weights or {})}
    obj: Objective
    if "classify" in objectives:
        if labels is None:
            raise ConfigError("objective 'classify' needs labels (one class index per cell)", field="labels")
        if getattr(model, "classifier", None) is None:
            raise ConfigError("the model has no classifier head", field="classifier",
                              fix="build it with EpiAgentConfig(classifier='linear'|'mlp', num_classes=C)")
        obj = Classification(cs, rows, np.asarray(labels, dtype=np.int64)[rows],
                             loss="focal" if model.config.classifier == "mlp" else "ce", max_len=max_len)
    else:
        mse = "mse" in objectives
        sr = "mse" if mse else (cfg.sr_objective if "sr" in objectives else None)
        obj = Reconstruction(cs, input_rows=rows, sr=sr,
                             cca=mse or "cca" in objectives, k=cfg.k, max_len=max_len,
                             conditions=None if batch_ids is None else np.asarray(batch_ids, dtype=np.int64)[rows],
                             weights={"cca": w["mse"] if mse else w["cca"], "sr": w["mse"] if mse else w["sr"]},
                             heads_at_head_lr=False, sr_pos_weight=cfg.sr_pos_weight)
    fc = FitConfig(epochs=cfg.epochs, batch_tokens=int(cfg.batch_tokens), lr=cfg.lr, weight_decay=cfg.weight_decay,
                   schedule=cfg.schedule, warmup=0 if cfg.warmup is None else int(cfg.warmup),
                   warmup_fraction=0.05 if cfg.warmup is None else 0.0, clip_grad=cfg.clip_grad, seed=cfg.seed,
                   device=cfg.device, progress=cfg.progress, desc="finetune")
    steps = fit(model, obj, fc)
    terms = [c for c in steps.columns if c in ("cca", "sr", "classify")]
    hist = steps.groupby("epoch")[terms].mean()
    history = [{k: float(v) for k, v in row.items()} | {"epoch": int(ep) + 1} for ep, row in hist.iterrows()]
    for h in history:
        log.info("finetune epoch %d: %s", h["epoch"], h)
    return {"history": history, "steps": int(len(steps)), "log": steps}


def embed_cells(model: EpiAgent, data: Any, *, batch_tokens: int = 65536, max_len: int = 8190,
                device: str | torch.device | None = None, batch_ids: np.ndarray | None = None,
                progress: bool = False) -> np.ndarray:
    """Zero-shot (or fine-tuned) cell embeddings ``[n_cells, dim]`` of ``data`` (top-``max_len`` tokens)."""
    from ..model.inference import embed_sentences

    cs = Shard.from_any(data)
    return embed_sentences(model, cs.indptr, cs.tokens, batch_ids=batch_ids, batch_tokens=batch_tokens,
                           device=device, max_len=max_len, progress=progress)


__all__ = ["finetune", "FinetuneConfig", "embed_cells", "OBJECTIVES", "NUM_SPECIAL"]
