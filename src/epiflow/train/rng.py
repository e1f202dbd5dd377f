"""Counter-based, vectorised random numbers for the data pipeline.

Every random decision of a training batch (subsampling of long sentences, CCA negatives, RLM
replacements) is a pure function of ``(seed, epoch, cell uid, purpose, counter)``. This makes the
pipeline

* deterministic given the seed and the step (exact resume needs no data-loader RNG state),
* independent of how a batch is split over ranks, workers or accumulation micro-batches (two
  processes with half a batch each draw exactly the numbers one process with the whole batch draws),
* fully vectorised (one splitmix64 hash per number, numpy uint64 arithmetic wraps modulo 2**64).
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

# purposes (stream ids)
SUBSAMPLE = 1
NEGATIVES = 2
RLM_POSITIONS = 3
RLM_TOKENS = 4
EVAL_NEGATIVES = 5


def mix64(x) -> np.ndarray:
    """splitmix64 finaliser (bijective, good avalanche), elementwise on uint64."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        x = x ^ (x >> np.uint64(31))
    return x


def cell_keys(seed: int, epoch: int, purpose: int, uids) -> np.ndarray:
    """One 64-bit key per cell for a (seed, epoch, purpose) stream."""
    with np.errstate(over="ignore"):
        base = mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ mix64(np.uint64(epoch + 1) * _GOLDEN)
                     ^ mix64(np.uint64(purpose) * _M2))
        return mix64(base ^ mix64(np.asarray(uids, dtype=np.uint64) * _GOLDEN + np.uint64(1)))


def uniform(keys, counters) -> np.ndarray:
    """Uniform floats in [0, 1) for (key, counter) pairs (arrays broadcast)."""
    with np.errstate(over="ignore"):
        x = mix64(np.asarray(keys, dtype=np.uint64) + np.asarray(counters, dtype=np.uint64) * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def per_element_uniform(keys_per_row, lengths, counter_offset: int = 0) -> np.ndarray:
    """Uniforms for a CSR layout: row ``i`` gets ``lengths[i]`` numbers from its own stream."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths) + counter_offset
    return uniform(np.repeat(np.asarray(keys_per_row, dtype=np.uint64), lengths), pos.astype(np.uint64))


class KeyedUniform:
    """Duck-typed stand-in for ``np.random.Generator`` whose ``random(n)`` returns precomputed
    per-token uniforms (so :func:`epiflow.tokenize.subsample_sentences` draws split-invariant keys)."""

    def __init__(self, values: np.ndarray):
        self._values = np.asarray(values, dtype=np.float64)

    def random(self, n: int) -> np.ndarray:
        if n != len(self._values):
            raise ValueError(f"KeyedUniform holds {len(self._values)} values, {n} requested")
        return self._values.copy()
