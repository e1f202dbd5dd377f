"""Preprocessing shared by the baselines: gene-activity scores and the paper's feature selections.

* :func:`gene_activity` — cells x genes scores: the counts of the features (cCREs / peaks) that
  overlap each gene's body extended 2 kb upstream (strand aware), as one sparse product
  ``counts @ A`` with ``A[feature, gene] = 1`` for each overlap (found with
  :func:`epiflow.genome.intervals.overlap_pairs`). The gene file is BED6 (chrom, start, end, name,
  score, strand), e.g. ``hg38_genes.bed.gz``; a TSS file (1-bp intervals such as ``hg19_tss.bed.gz``)
  works the same way and then scores the TSS window ``[tss - upstream, tss + 1)`` (plus
  ``downstream`` bp past the TSS).
* :func:`top_accessible` — the ``n`` features accessible in the most cells (paper: top-50,000 cCREs
  as the input of scGen, scPRAM and GEARS).
* :func:`log_normalise` — ``log1p(x / depth * 1e4)`` of binarised counts.
* :func:`feature_coords` — ``chrom / start / end`` of the features from ``var`` columns or
  ``chrom:start-end`` names.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import EpiflowError, InputFormatError
from ..tokenize.core import binarize as to_binary

log = logging.getLogger(__name__)


def feature_coords(var: pd.DataFrame) -> pd.DataFrame | None:
    """``DataFrame(chrom, start, end)`` of the features, or ``None`` when the coordinates are unknown."""
    if {"chrom", "start", "end"} <= set(var.columns):
        return pd.DataFrame({"chrom": var["chrom"].astype(str).to_numpy(),
                             "start": var["start"].to_numpy(np.int64), "end": var["end"].to_numpy(np.int64)})
    names = pd.Series(np.asarray(var.index).astype(str))
    m = names.str.extract(r"^([^:_]+)[:_](\d+)[-_](\d+)$")
    if m.isna().any(axis=None) or len(m) == 0:
        return None
    return pd.DataFrame({"chrom": m[0].to_numpy(), "start": m[1].astype(np.int64).to_numpy(),
                         "end": m[2].astype(np.int64).to_numpy()})


def read_genes(path) -> pd.DataFrame:
    """A BED6 gene (or TSS) file (plain or gzipped): chrom, start, end, name, strand."""
    path = Path(path)
    if not path.exists():
        raise InputFormatError("gene annotation file does not exist", path=str(path),
                               fix="pass a BED6 gene file (chrom start end name score strand)")
    from ..errors import decompression_errors

    opener = gzip.open if path.suffix == ".gz" else open
    with decompression_errors(path, "gene annotation file"), opener(path, "rt") as fh:
        first = fh.readline()
    ncol = len(first.rstrip("\n").split("\t"))
    if ncol < 6:
        raise InputFormatError(f"expected BED6 (chrom start end name score strand), found {ncol} columns",
                               path=str(path), line=1, fix="give a BED6 gene file with the strand in column 6")
    try:
        with decompression_errors(path, "gene annotation file"):
            df = pd.read_csv(path, sep="\t", header=None, usecols=[0, 1, 2, 3, 5], comment="#",
                             names=["chrom", "start", "end", "name", "strand"],
                             dtype={0: str, 1: np.int64, 2: np.int64, 3: str, 5: str})
    except (ValueError, pd.errors.ParserError) as exc:
        raise InputFormatError(f"cannot read the gene file as BED6 ({str(exc).splitlines()[0]})", path=str(path),
                               fix="give a BED6 gene file: chrom, start, end (integers), name, score, strand") from None
    bad = ~df["strand"].isin(["+", "-", "."])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputFormatError(f"strand must be +, - or ., got {df['strand'].iloc[i]!r}", path=str(path),
                               line=i + 1, field="strand")
    return df


def gene_windows(genes: pd.DataFrame, upstream: int = 2000, downstream: int = 0) -> pd.DataFrame:
    """Gene body extended ``upstream`` bp before the TSS (and ``downstream`` bp past the TES), by strand.

    Genes with strand ``.`` are extended on both sides."""
    start = genes["start"].to_numpy(np.int64).copy()
    end = genes["end"].to_numpy(np.int64).copy()
    strand = genes["strand"].to_numpy(str)
    plus, minus, none = strand == "+", strand == "-", strand == "."
    start[plus | none] -= upstream
    end[minus | none] += upstream
    end[plus] += downstream
    start[minus] -= downstream
    return pd.DataFrame({"chrom": genes["chrom"].to_numpy(), "start": np.maximum(start, 0), "end": end,
                         "name": genes["name"].to_numpy()})


def gene_activity(counts, features: pd.DataFrame, genes, *, upstream: int = 2000, downstream: int = 0,
                  binarize: bool = True, min_features: int = 1):
    """Cells x genes activity scores (CSR float32) and the gene names (see the module docstring).

    ``features``: ``chrom, start, end`` of the count matrix's columns. ``genes``: a BED6 path or a
    DataFrame (chrom, start, end, name, strand). Genes overlapped by fewer than ``min_features``
    features are dropped. Duplicate gene names are summed into one column."""
    from ..genome.intervals import normalize_chrom, overlap_pairs

    g = read_genes(genes) if not isinstance(genes, pd.DataFrame) else genes
    win = gene_windows(g, upstream, downstream)
    counts = sp.csr_matrix(counts, dtype=np.float32)
    if counts.shape[1] != len(features):
        raise EpiflowError(f"{len(features)} feature coordinates for {counts.shape[1]} matrix columns",
                           field="var")
    if binarize:
        counts = to_binary(counts)
    ia, ib = overlap_pairs(normalize_chrom(features["chrom"].to_numpy()), features["start"], features["end"],
                           normalize_chrom(win["chrom"].to_numpy()), win["start"], win["end"])
    names, gcode = np.unique(win["name"].to_numpy(str), return_inverse=True)
    a = sp.csr_matrix((np.ones(len(ia), np.float32), (ia, gcode[ib])), shape=(counts.shape[1], len(names)))
    a.data[:] = 1.0  # a feature in two windows of the same gene name counts once
    nfeat = np.asarray((a > 0).sum(axis=0)).ravel()
    keep = np.flatnonzero(nfeat >= max(1, min_features))
    if keep.size == 0:
        raise EpiflowError("no gene window overlaps any feature: check that the gene file and the features "
                           "use the same genome build", field="genes")
    ga = (counts @ a[:, keep]).tocsr().astype(np.float32)
    log.info("gene activity: %d features -> %d genes (%d feature-gene overlaps)", counts.shape[1], keep.size,
             len(ia))
    return ga, names[keep]


def accessible_cells(counts) -> np.ndarray:
    """Per feature: number of cells with a non-zero count."""
    x = sp.csr_matrix(counts)
    x.eliminate_zeros()
    return np.bincount(x.indices, minlength=x.shape[1])


def top_accessible(counts, n: int = 50_000) -> np.ndarray:
    """Sorted indices of the ``n`` features accessible in the most cells (ties: lower index first)."""
    nc = accessible_cells(counts)
    if n >= len(nc):
        return np.arange(len(nc))
    order = np.argsort(-nc, kind="stable")[:n]
    return np.sort(order)


def log_normalise(counts, binarize: bool = True, scale: float = 1e4) -> sp.csr_matrix:
    """``log1p(x / depth * scale)`` per cell (CSR float32); binarised first by default."""
    if binarize:
        x = to_binary(counts)
    else:
        x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        x.eliminate_zeros()
    depth = np.asarray(x.sum(axis=1)).ravel()
    depth[depth == 0] = 1.0
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    x.data = np.log1p(x.data / depth[rows] * scale).astype(np.float32)
    return x
