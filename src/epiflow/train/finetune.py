"""Generic fine-tuning loop used by the downstream tasks (SPEC §5).

``finetune(model, data, objectives=(...))`` trains ``model`` in place on the cells of ``data`` (a
corpus folder, a :class:`~epiflow.corpus.shard.Shard`, shard paths, or a list of those) with any
combination of

* ``"cca"``  - cell-cCRE alignment, K negatives per positive (default K = 1, pos_weight = K);
* ``"sr"``   - signal reconstruction, BCE with pos_weight 100 (no dense target on the host);
* ``"classify"`` - classifier on the cell embedding: cross-entropy (``linear`` head) or the
  authors' focal loss (``mlp`` head), labels from ``labels``;
* ``"mse"``  - the imputation variant: CCA and SR as **MSE regression of TF-IDF values** (decoder
  outputs regress the cell's TF-IDF vector, 0 for inaccessible cCREs; CCA queries regress the TF-IDF
  of positives and 0 for negatives).

Batches come from :mod:`epiflow.train.data` (token budget, length bucketing, rank-preserving random
subsampling of long sentences, vectorised negatives), so the loop shares its semantics with
pretraining. ``embed_cells`` gives the zero-shot (or fine-tuned) embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..corpus.shard import Shard, open_corpus, read_shard
from ..errors import ConfigError
from ..tokenize import NUM_SPECIAL
from .data import BatchConfig, CorpusIndex, _cut_budget, make_batch
from .objectives import SR_OBJECTIVES, bce_sum, pos_rows_cols, sr_loss_sum, sr_multinomial_sum
from .optim import make_adamw, make_scheduler

if TYPE_CHECKING:
    from ..model import EpiAgent

log = logging.getLogger(__name__)

OBJECTIVES = ("cca", "sr", "classify", "mse")


class CellSet:
    """Cells held in memory (tokens and TF-IDF, rank-ordered CSR); quacks like a ShardCache."""

    def __init__(self, indptr, tokens, tfidf, n_ccres: int, obs=None):
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.tfidf = np.asarray(tfidf, dtype=np.float32)
        self.n_ccres = int(n_ccres)
        self.obs = obs
        self.lengths = np.diff(self.indptr)
        self.index = CorpusIndex([], np.array([0, len(self.lengths)]), self.lengths, self.n_ccres)

    @property
    def n_cells(self) -> int:
        return len(self.lengths)

    def _gather(self, uids, arr):
        uids = np.asarray(uids, dtype=np.int64)
        ln = self.lengths[uids]
        ptr = np.concatenate([[0], np.cumsum(ln)]).astype(np.int64)
        src = np.repeat(self.indptr[uids], ln) + (np.arange(int(ptr[-1])) - np.repeat(ptr[:-1], ln))
        return ptr, arr[src]

    def sentences(self, uids):
        return self._gather(uids, self.tokens)

    def values(self, uids):
        return self._gather(uids, self.tfidf)[1]

    @classmethod
    def from_any(cls, data) -> "CellSet":
        if isinstance(data, CellSet):
            return data
        if isinstance(data, Shard):
            shards = [data]
        elif isinstance(data, (str, Path)) and (Path(data) / "corpus.json").exists():
            shards = list(open_corpus(data).iter_shards())
        elif isinstance(data, (str, Path)):
            shards = [read_shard(data)]
        else:
            shards = [s if isinstance(s, Shard) else read_shard(s) for s in data]
        if not shards:
            raise ConfigError("no cells to fine-tune on", field="data")
        n = {s.n_ccres for s in shards}
        if len(n) != 1:
            raise ConfigError(f"shards disagree on the vocabulary size ({sorted(n)})", field="data")
        lens = np.concatenate([s.lengths for s in shards])
        import pandas as pd

        return cls(np.concatenate([[0], np.cumsum(lens)]), np.concatenate([s.tokens for s in shards]),
                   np.concatenate([s.tfidf for s in shards]), n.pop(),
                   pd.concat([s.obs for s in shards], ignore_index=True))


@dataclass
class FinetuneConfig:
    objectives: tuple = ("cca", "sr")
    epochs: int = 5
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup: int | None = None
    weight_decay: float = 0.01
    clip_grad: float | None = 1.0
    batch_tokens: int = 16384
    max_cells: int | None = None
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
    """Fine-tune ``model`` in place; returns ``{"history": [per-epoch mean losses], "steps": n}``.

    ``cells``: indices of the cells of ``data`` to train on (default all); ``labels``: class index per
    cell of ``data`` (for ``"classify"``); ``batch_ids``: conditional batch token per cell (-1 = none).
    """
    cfg = config or FinetuneConfig()
    if kw:
        import dataclasses

        cfg = dataclasses.replace(cfg, **kw)
    objectives = tuple(objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise ConfigError(f"unknown fine-tuning objective(s) {bad or objectives}", field="objectives",
                          fix=f"choose from {', '.join(OBJECTIVES)}")
    if cfg.sr_objective not in SR_OBJECTIVES:
        raise ConfigError(f"unknown SR objective {cfg.sr_objective!r}", field="sr_objective",
                          fix="use bce (the paper) or multinomial")
    cs = CellSet.from_any(data)
    if model.config.n_ccres != cs.n_ccres:
        from ..errors import VocabularyMismatchError

        raise VocabularyMismatchError(f"the model has {model.config.n_ccres} cCREs but the data has {cs.n_ccres}",
                                      field="data", fix="fine-tune on data tokenized with the model's vocabulary")
    if "classify" in objectives:
        if labels is None:
            raise ConfigError("objective 'classify' needs labels (one class index per cell)", field="labels")
        labels = torch.as_tensor(np.array(labels, dtype=np.int64))
        if getattr(model, "classifier", None) is None:
            raise ConfigError("the model has no classifier head", field="classifier",
                              fix="build it with EpiAgentConfig(classifier='linear'|'mlp', num_classes=C)")
    regression = "mse" in objectives
    device = torch.device(cfg.device) if cfg.device else next(model.parameters()).device
    model.to(device).train()
    max_len = cfg.max_len or min(8190, model.config.max_rank - 2)
    cells = np.arange(cs.n_cells) if cells is None else np.asarray(cells, dtype=np.int64)
    bid = None if batch_ids is None else torch.as_tensor(np.array(batch_ids, dtype=np.int64))
    w = {"cca": 1.0, "sr": 1.0, "classify": 1.0, "mse": 1.0, **(cfg.weights or {})}
    padded = np.minimum(cs.lengths, max_len) + 2
    rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = len(_cut_budget(np.sort(padded[cells]), cfg.batch_tokens, 1, cfg.max_cells)) - 1
    total = max(1, steps_per_epoch * cfg.epochs)
    opt = make_adamw(list(model.named_parameters()), cfg.lr, cfg.weight_decay)
    sched = make_scheduler(opt, cfg.schedule, cfg.warmup if cfg.warmup is not None else max(1, total // 20),
                           total)
    bcfg = BatchConfig(n_ccres=cs.n_ccres, max_len=max_len, k=cfg.k, seed=cfg.seed)
    use_cca = "cca" in objectives or regression
    use_sr = "sr" in objectives or regression
    history, step = [], 0
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="finetune", unit="step", disable=not cfg.progress, leave=False)
    for epoch in range(cfg.epochs):
        order = cells[rng.permutation(len(cells))]
        batches = []
        for a in range(0, len(order), 512):  # length buckets of 512 shuffled cells
            bucket = order[a:a + 512]
            bucket = bucket[np.argsort(padded[bucket], kind="stable")]
            cuts = _cut_budget(padded[bucket], cfg.batch_tokens, 1, cfg.max_cells)
            batches += [bucket[x:y] for x, y in zip(cuts[:-1], cuts[1:])]
        sums: dict[str, float] = {}
        for i in rng.permutation(len(batches)):
            uids = batches[i]
            b = make_batch(cs, uids, epoch, bcfg, train=True)
            ids = b["input_ids"].to(device)
            out = model(ids, batch_ids=None if bid is None else bid[uids].to(device))
            cell = out.cell_embedding
            terms = {}
            rows, cols = pos_rows_cols(b["pos_ptr"].to(device), b["pos_ccre"].to(device))
            if use_cca:
                q = b["cca_ids"].to(device)
                lg = model.cca_logits(cell[b["cca_cell"].to(device)], q)
                if regression:
                    tgt = torch.zeros_like(lg)
                    pos = b["cca_label"].to(device) > 0
                    tgt[pos] = torch.from_numpy(cs.values(uids)).to(device)  # positives are in sentence order
                    terms["cca"] = F.mse_loss(lg.float(), tgt)
                else:
                    terms["cca"] = bce_sum(lg, b["cca_label"].to(device), float(cfg.k)) / len(lg)
            if use_sr:
                sig = model.signal_logits(cell).float()
                if regression:
                    vals = torch.from_numpy(cs.values(uids)).to(device)
                    # sum((x - y)^2) = sum(x^2) + sum_pos((x - v)^2 - x^2): no dense target
                    xp = sig[rows, cols]
                    terms["sr"] = (sig.pow(2).sum() + ((xp - vals).pow(2) - xp.pow(2)).sum()) / sig.numel()
                elif cfg.sr_objective == "multinomial":
                    terms["sr"] = sr_multinomial_sum(sig, rows, cols) / len(sig)
                else:
                    terms["sr"] = sr_loss_sum(sig, rows, cols, cfg.sr_pos_weight) / sig.numel()
            if "classify" in objectives:
                logits = model.classify(cell)
                y = labels[uids].to(device)
                if model.config.classifier == "mlp":
                    from ..model.losses import focal_loss

                    terms["classify"] = focal_loss(logits, y)
                else:
                    terms["classify"] = F.cross_entropy(logits, y)
            loss = sum(w["mse" if regression and k in ("cca", "sr") else k] * v for k, v in terms.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * len(uids)
        history.append({k: v / len(cells) for k, v in sums.items()} | {"epoch": epoch + 1})
        log.info("finetune epoch %d: %s", epoch + 1, history[-1])
    bar.close()
    model.eval()
    return {"history": history, "steps": step}


def embed_cells(model: EpiAgent, data: Any, *, batch_tokens: int = 65536, max_len: int = 8190,
                device: str | torch.device | None = None, batch_ids: np.ndarray | None = None,
                progress: bool = False) -> np.ndarray:
    """Zero-shot (or fine-tuned) cell embeddings ``[n_cells, dim]`` of ``data`` (top-``max_len`` tokens)."""
    from ..model.inference import embed_sentences

    cs = CellSet.from_any(data)
    return embed_sentences(model, cs.indptr, cs.tokens, batch_ids=batch_ids, batch_tokens=batch_tokens,
                           device=device, max_len=max_len, progress=progress)


__all__ = ["finetune", "FinetuneConfig", "CellSet", "embed_cells", "OBJECTIVES", "NUM_SPECIAL"]
