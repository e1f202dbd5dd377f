"""Streaming pretraining data over corpus shards (SPEC §2, §4).

Layout of one epoch (all deterministic given ``(seed, epoch)``, computed from the shards' ``indptr``
only, so a plan costs a few integer sorts even for millions of cells):

1. shards are visited in a seeded random order, ``window_shards`` at a time (streaming: only the
   shards of the current window are ever held in memory);
2. the training cells of a window are shuffled, cut into buckets of ``bucket_cells`` cells, sorted by
   (capped) length inside each bucket, and cut into *global micro-batches* whose padded size
   ``n_cells * (max_len + 2)`` stays within ``batch_tokens * world_size`` (length bucketing +
   token budget);
3. the micro-batches of a window are shuffled; ``grad_accum`` consecutive ones form one optimiser
   step.

A global micro-batch is split over the ``world_size`` ranks by interleaving its length-sorted cells,
so every rank gets about ``batch_tokens`` tokens, and one process with the whole batch sees exactly
the cells of two processes with half of it each. Everything random inside a batch (subsampling of
long sentences, CCA negatives, RLM replacements) is keyed by (seed, epoch, cell), see
:mod:`epiflow.train.rng`, so the data position of a run is fully described by its step.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import torch

from ..corpus.shard import SHARD_FORMAT, open_corpus
from ..errors import InputFormatError
from ..tokenize import NUM_SPECIAL, build_input_ids, subsample_sentences, truncate_sentences
from . import rng as krng
from .sampling import rlm_replace, sample_complement, sample_complement_weighted

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 8190


# ----------------------------------------------------------------------------- corpus index
@dataclass
class CorpusIndex:
    """Per-cell lengths and locations over all shards of a corpus (no tokens held)."""

    shard_paths: list
    shard_offsets: np.ndarray  # [n_shards + 1] first global cell uid of each shard
    lengths: np.ndarray        # [n_cells] number of accessible cCREs of each cell
    n_ccres: int
    vocab_id: str = ""

    @property
    def n_cells(self) -> int:
        return int(self.shard_offsets[-1])

    @property
    def n_shards(self) -> int:
        return len(self.shard_paths)

    def shard_of(self, uids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.shard_offsets, np.asarray(uids, dtype=np.int64), side="right") - 1


def _open_h5(path: Path):
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputFormatError(f"not a readable HDF5 shard ({exc})", path=str(path),
                               fix="rebuild the corpus; the file is truncated or foreign") from None
    if f.attrs.get("format") != SHARD_FORMAT:
        f.close()
        raise InputFormatError("not an epiflow shard (attribute 'format' missing)", path=str(path),
                               fix="pass a shard written by epiflow build-corpus")
    return f


def build_index(corpus_dir: str | os.PathLike) -> CorpusIndex:
    corpus = open_corpus(corpus_dir)
    paths = corpus.shard_paths
    if not paths:
        raise InputFormatError("the corpus has no shards", path=str(Path(corpus_dir) / "corpus.json"),
                               field="shards", fix="rebuild the corpus with epiflow build-corpus")
    lens, counts = [], []
    for p in paths:
        if not p.exists():
            raise InputFormatError("shard listed in corpus.json is missing", path=str(p),
                                   fix="rebuild the corpus or restore the file")
        with _open_h5(p) as f:
            n_ccres = int(f.attrs["n_ccres"])
            if n_ccres != corpus.n_ccres:
                raise InputFormatError(f"shard has {n_ccres} cCREs but the corpus has {corpus.n_ccres}",
                                       path=str(p), field="n_ccres", fix="rebuild the corpus")
            ip = f["indptr"][:]
        lens.append(np.diff(ip).astype(np.int64))
        counts.append(len(ip) - 1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return CorpusIndex(list(paths), offsets, np.concatenate(lens), corpus.n_ccres, corpus.vocab_id)


class SentenceSource(Protocol):
    """What :func:`make_batch` reads cells from: a :class:`ShardCache`, or the in-memory
    :class:`epiflow.corpus.shard.Shard`."""

    def sentences(self, uids) -> tuple[np.ndarray, np.ndarray]: ...


class ShardCache:
    """Holds the (indptr, tokens) of the few most recently used shards (streaming window)."""

    def __init__(self, index: CorpusIndex, capacity: int = 2):
        self.index = index
        self.capacity = max(1, int(capacity))
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, s: int):
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        with _open_h5(Path(self.index.shard_paths[s])) as f:
            item = (f["indptr"][:].astype(np.int64), f["tokens"][:].astype(np.int64))
        self._cache[s] = item
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return item

    def sentences(self, uids) -> tuple[np.ndarray, np.ndarray]:
        """Full (uncapped) sentences of the given cells, CSR ``(indptr, tokens)`` in the given order."""
        uids = np.asarray(uids, dtype=np.int64)
        shard = self.index.shard_of(uids)
        lens = self.index.lengths[uids]
        out_ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        out = np.empty(int(out_ptr[-1]), dtype=np.int64)
        for s in np.unique(shard):  # a loop over (few) shards, not over cells
            sel = np.flatnonzero(shard == s)
            ip, tok = self.get(int(s))
            rows = uids[sel] - self.index.shard_offsets[s]
            starts = ip[rows]
            ln = lens[sel]
            src = np.repeat(starts, ln) + (np.arange(ln.sum()) - np.repeat(np.cumsum(ln) - ln, ln))
            dst = np.repeat(out_ptr[sel], ln) + (np.arange(ln.sum()) - np.repeat(np.cumsum(ln) - ln, ln))
            out[dst] = tok[src]
        return out_ptr, out


# ----------------------------------------------------------------------------- splits and plans
def split_cells(n_cells: int, eval_fraction: float, seed: int,
                max_eval: int | None = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of cell uids into (train, held-out) sets."""
    n_eval = int(round(n_cells * float(eval_fraction)))
    if eval_fraction > 0:
        n_eval = max(n_eval, min(2, n_cells - 1))
    if max_eval is not None:
        n_eval = min(n_eval, int(max_eval))
    perm = np.random.default_rng([int(seed), 7771]).permutation(n_cells)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


@dataclass
class PlanConfig:
    batch_tokens: int = 16384      # padded tokens per rank and micro-batch
    world_size: int = 1
    max_len: int = DEFAULT_MAX_LEN
    window_shards: int = 2
    bucket_cells: int = 1024
    seed: int = 0
    max_cells: int | None = None   # optional cap on cells per rank micro-batch


def _cut_budget(sorted_len: np.ndarray, budget: int, min_cells: int, max_cells: int | None) -> list[int]:
    """Greedy cut of ascending padded lengths into batches with n * max_len <= budget.

    A loop over batches (binary search for each end), never over cells.
    """
    n = len(sorted_len)
    cuts = [0]
    s = 0
    while s < n:
        # largest e with (e - s) * sorted_len[e - 1] <= budget, found by bisection over e
        lo, hi = s + 1, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (mid - s) * int(sorted_len[mid - 1]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        e = max(lo, min(s + min_cells, n))
        if max_cells is not None:
            e = min(e, s + max_cells)
        cuts.append(e)
        s = e
    return cuts


def epoch_plan(index: CorpusIndex, train_uids: np.ndarray, epoch: int, cfg: PlanConfig) -> list[np.ndarray]:
    """The global micro-batches (arrays of cell uids, length-sorted) of one epoch."""
    rng = np.random.default_rng([int(cfg.seed), 1009, int(epoch)])
    train_uids = np.asarray(train_uids, dtype=np.int64)
    shard = index.shard_of(train_uids)
    order = rng.permutation(index.n_shards)
    padded = np.minimum(index.lengths, cfg.max_len) + 2
    budget = int(cfg.batch_tokens) * int(cfg.world_size)
    max_cells = None if cfg.max_cells is None else int(cfg.max_cells) * int(cfg.world_size)
    batches: list[np.ndarray] = []
    w = max(1, int(cfg.window_shards))
    for start in range(0, len(order), w):
        win = order[start:start + w]
        cells = train_uids[np.isin(shard, win)]
        if len(cells) == 0:
            continue
        cells = cells[rng.permutation(len(cells))]
        win_batches: list[np.ndarray] = []
        for b0 in range(0, len(cells), int(cfg.bucket_cells)):
            bucket = cells[b0:b0 + int(cfg.bucket_cells)]
            bucket = bucket[np.argsort(padded[bucket], kind="stable")]
            cuts = _cut_budget(padded[bucket], budget, int(cfg.world_size), max_cells)
            win_batches.extend(bucket[a:b] for a, b in zip(cuts[:-1], cuts[1:]))
        # drop batches too small to give every rank a cell (only possible at the very end)
        win_batches = [b for b in win_batches if len(b) >= cfg.world_size]
        perm = rng.permutation(len(win_batches))
        batches.extend(win_batches[i] for i in perm)
    return batches


def rank_part(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The cells of a global micro-batch that ``rank`` processes (interleaved by length)."""
    return np.asarray(batch)[rank::world_size]


# ----------------------------------------------------------------------------- batch building
@dataclass
class BatchConfig:
    n_ccres: int
    max_len: int = DEFAULT_MAX_LEN
    k: int = 1                     # CCA negatives per positive
    rlm: bool = False              # build the RLM replaced input as well
    rlm_fraction: float = 0.5
    seed: int = 0
    cca_max_pos: int | None = None  # optional cap on CCA positives per cell (None = all, as the paper)
    neg_weights: np.ndarray | None = None  # CCA negatives drawn with these weights (None = uniform, paper)


def _csr_lengths(ptr):
    return np.diff(np.asarray(ptr, dtype=np.int64))


def make_batch(cache: SentenceSource, uids: np.ndarray, epoch: int, cfg: BatchConfig, *, train: bool = True) -> dict:
    """Tensors of one (rank's) micro-batch.

    Keys: ``uids`` [B]; ``input_ids`` [B, L]; ``pos_ptr``/``pos_ccre`` (CSR of ALL accessible cCREs,
    0-based: SR targets); ``cca_ids`` [Q] token ids, ``cca_cell`` [Q] row of each query,
    ``cca_label`` [Q] (positives first, then min(K * n_pos, N - n_pos) negatives per cell);
    with ``rlm``: ``rlm_input_ids`` [B, L] and ``rlm_label`` [T] (one per cCRE token, row-major).
    In training, sentences longer than ``max_len`` are subsampled (rank-preserving, keyed by cell
    and epoch); otherwise the top ``max_len`` tokens are kept (the inference rule).
    """
    uids = np.asarray(uids, dtype=np.int64)
    B = len(uids)
    full_ptr, full_tok = cache.sentences(uids)
    full_len = _csr_lengths(full_ptr)
    # model input
    if train and full_len.max(initial=0) > cfg.max_len:
        u = krng.per_element_uniform(krng.cell_keys(cfg.seed, epoch, krng.SUBSAMPLE, uids), full_len)
        in_ptr, in_tok = subsample_sentences(full_ptr, full_tok, cfg.max_len, krng.KeyedUniform(u))
    else:
        in_ptr, in_tok = truncate_sentences(full_ptr, full_tok, cfg.max_len)
    input_ids = build_input_ids(in_ptr, in_tok)
    pos_ccre = full_tok - NUM_SPECIAL
    # CCA queries: positives (all accessible, optionally capped), then negatives
    if cfg.cca_max_pos is not None:
        cp_ptr, cp_tok = truncate_sentences(full_ptr, full_tok, int(cfg.cca_max_pos))
    else:
        cp_ptr, cp_tok = full_ptr, full_tok
    n_pos = _csr_lengths(cp_ptr)
    neg_keys = krng.cell_keys(cfg.seed, epoch, krng.NEGATIVES if train else krng.EVAL_NEGATIVES, uids)
    if cfg.neg_weights is None:
        neg_ptr, neg = sample_complement(neg_keys, full_ptr, pos_ccre, cfg.n_ccres, int(cfg.k) * n_pos)
    else:
        neg_ptr, neg = sample_complement_weighted(neg_keys, full_ptr, pos_ccre, cfg.n_ccres,
                                                  int(cfg.k) * n_pos, cfg.neg_weights)
    n_neg = _csr_lengths(neg_ptr)
    q_len = n_pos + n_neg
    q_ptr = np.concatenate([[0], np.cumsum(q_len)]).astype(np.int64)
    q_cell = np.repeat(np.arange(B, dtype=np.int64), q_len)
    within = np.arange(int(q_ptr[-1])) - np.repeat(q_ptr[:-1], q_len)
    is_pos = within < np.repeat(n_pos, q_len)
    cca_ids = np.empty(int(q_ptr[-1]), dtype=np.int64)
    cca_ids[is_pos] = cp_tok
    cca_ids[~is_pos] = neg + NUM_SPECIAL
    out = {
        "uids": torch.from_numpy(uids),
        "input_ids": torch.from_numpy(input_ids),
        "pos_ptr": torch.from_numpy(full_ptr),
        "pos_ccre": torch.from_numpy(pos_ccre),
        "cca_ids": torch.from_numpy(cca_ids),
        "cca_cell": torch.from_numpy(q_cell),
        "cca_label": torch.from_numpy(is_pos.astype(np.float32)),
        "n_input_tokens": torch.tensor(int(len(in_tok))),
    }
    if cfg.rlm:
        new_tok, labels = rlm_replace(krng.cell_keys(cfg.seed, epoch, krng.RLM_POSITIONS, uids),
                                      krng.cell_keys(cfg.seed, epoch, krng.RLM_TOKENS, uids),
                                      in_ptr, in_tok, full_ptr, pos_ccre, cfg.n_ccres, cfg.rlm_fraction)
        out["rlm_input_ids"] = torch.from_numpy(build_input_ids(in_ptr, new_tok, pad_to=input_ids.shape[1]))
        out["rlm_label"] = torch.from_numpy(labels)
    return out


def step_normalizers(lengths: np.ndarray, n_ccres: int, k: int, max_len: int, rlm: bool,
                     cca_max_pos: int | None = None) -> dict:
    """Denominators of the mean losses over ALL cells of one optimiser step (every rank and
    accumulation micro-batch), so that the update does not depend on how the step is split."""
    lengths = np.asarray(lengths, dtype=np.int64)
    npos = lengths if cca_max_pos is None else np.minimum(lengths, int(cca_max_pos))
    nneg = np.minimum(int(k) * npos, n_ccres - lengths)
    return {
        "sr": float(len(lengths)) * float(n_ccres),
        "cca": float((npos + nneg).sum()),
        "rlm": float(np.minimum(lengths, max_len).sum()) if rlm else 0.0,
        "cells": float(len(lengths)),
    }


# ----------------------------------------------------------------------------- streaming dataset
class MicroBatchStream(torch.utils.data.IterableDataset):
    """Yields this rank's part of the global micro-batches ``start, start + 1, ...`` of one epoch.

    With ``num_workers`` loader workers, worker ``w`` builds items ``start + w, start + w + W, ...``;
    the DataLoader's round-robin fetching then returns them in plan order.
    """

    def __init__(self, index: CorpusIndex, plan: list, epoch: int, start: int, rank: int,
                 world_size: int, batch_cfg: BatchConfig, cache_shards: int = 2, stop: int | None = None):
        super().__init__()
        self.index, self.plan, self.epoch = index, plan, int(epoch)
        self.start = int(start)
        self.stop = len(plan) if stop is None else int(stop)
        self.rank, self.world_size = int(rank), int(world_size)
        self.batch_cfg = batch_cfg
        self.cache_shards = cache_shards

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        cache = ShardCache(self.index, self.cache_shards)
        for i in range(self.start + wid, self.stop, nw):
            part = rank_part(self.plan[i], self.rank, self.world_size)
            batch = make_batch(cache, part, self.epoch, self.batch_cfg, train=True)
            batch["micro_index"] = torch.tensor(i)
            yield batch


def loader(stream: MicroBatchStream, num_workers: int = 0, pin_memory: bool = False):
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=int(num_workers),
                                       pin_memory=pin_memory,
                                       # own generator: creating the loader never consumes the
                                       # global torch RNG (dropout), so resume stays exact
                                       generator=torch.Generator().manual_seed(0))
