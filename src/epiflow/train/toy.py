"""A small structured corpus written straight from a synthetic count matrix (tests, benchmarks).

Cells belong to ``n_types`` cell types; each type has its own set of preferentially accessible
cCREs, so the CCA objective has something to learn. Independent of the simulate/corpus stages: it
uses only :func:`epiflow.corpus.shard.shard_from_counts`, ``write_shard`` and ``write_corpus_meta``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..corpus.shard import shard_from_counts, vocab_id_from_intervals, write_corpus_meta, write_shard
from ..tokenize import document_frequency


def structured_counts(n_cells: int = 300, n_ccres: int = 600, n_types: int = 4, seed: int = 0,
                      p_in: float = 0.5, p_out: float = 0.005, p_common: float = 0.3, frac_common: float = 0.05):
    """A cells x cCREs CSR count matrix with cell-type-specific accessibility, and the type labels."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    ccre_type = rng.integers(0, n_types, n_ccres)
    common = rng.random(n_ccres) < frac_common
    depth = rng.lognormal(0.0, 0.35, n_cells)[:, None]
    p = np.where(ccre_type[None, :] == types[:, None], p_in, p_out)
    p = np.where(common[None, :], p_common, p)
    p = np.clip(p * depth, 0, 0.95)
    acc = rng.random((n_cells, n_ccres)) < p
    # guarantee every cell has a few accessible cCREs
    acc[np.arange(n_cells), rng.integers(0, n_ccres, n_cells)] = True
    counts = acc * rng.integers(1, 4, (n_cells, n_ccres))
    return sp.csr_matrix(counts.astype(np.float32)), types


def sparse_counts(n_cells: int = 300, n_ccres: int = 1_355_445, n_types: int = 8, seed: int = 0,
                  median: float = 2000.0):
    """Like :func:`structured_counts` at any vocabulary size, drawn sparse (that one builds dense
    ``n_cells x n_ccres`` arrays): log-normal sentence lengths (median ``median``, 200 to 8,190
    accessible cCREs), 70 % of each cell's cCREs in its type's block of the vocabulary."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    lens = np.clip(rng.lognormal(np.log(median), 0.6, n_cells), 200, 8190).astype(np.int64)
    block = n_ccres // n_types
    rows = [np.unique(np.concatenate([t * block + rng.integers(0, block, int(0.7 * n)),
                                     rng.integers(0, n_ccres, n - int(0.7 * n))]))
            for t, n in zip(types, lens)]
    idx, indptr = np.concatenate(rows), np.concatenate([[0], np.cumsum([len(x) for x in rows])])
    data = rng.integers(1, 4, len(idx)).astype(np.float32)
    return sp.csr_matrix((data, idx, indptr), shape=(n_cells, n_ccres)), types


def write_toy_corpus(out_dir, n_cells: int = 300, n_ccres: int = 600, n_types: int = 4, seed: int = 0,
                     shard_size: int = 100, counts_fn=None, **kw) -> Path:
    """Write a corpus folder (``corpus.json``, ``vocab.bed``, ``df.npy``, ``shards/``) from
    ``counts_fn(n_cells, n_ccres, n_types, seed, **kw)`` (default :func:`structured_counts`; at the
    paper's vocabulary size :func:`sparse_counts`)."""
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    counts, types = (counts_fn or structured_counts)(n_cells, n_ccres, n_types, seed, **kw)
    df = document_frequency(counts)
    df = np.where(df > 0, df, 1.0 / max(n_cells, 1))
    chrom = np.array(["chr1"] * n_ccres)
    start = np.arange(n_ccres, dtype=np.int64) * 1000 + 10_000
    end = start + 500
    vid = vocab_id_from_intervals(chrom, start, end)
    pd.DataFrame({"c": chrom, "s": start, "e": end}).to_csv(out / "vocab.bed", sep="\t", header=False, index=False)
    np.save(out / "df.npy", df.astype(np.float64))
    shards, sizes = [], []
    for i, a in enumerate(range(0, n_cells, shard_size)):
        b = min(n_cells, a + shard_size)
        obs = pd.DataFrame({"cell_id": [f"cell{j}" for j in range(a, b)], "dataset": "toy", "tissue": "toy",
                            "batch": "b0", "cell_type": [f"type{t}" for t in types[a:b]]})
        sh = shard_from_counts(counts[a:b], df, obs, vocab_id=vid, genome="hg38")
        rel = f"shards/shard_{i:05d}.h5"
        write_shard(out / rel, sh)
        shards.append(rel)
        sizes.append(b - a)
    write_corpus_meta(out, {"n_cells": int(n_cells), "n_ccres": int(n_ccres), "vocab_id": vid, "genome": "hg38",
                            "shards": shards, "shard_cells": sizes})
    return out
