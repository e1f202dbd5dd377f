"""GEARS-style gene graph from Gene Ontology annotations (SPEC §5, unseen genetic perturbation).

Two genes are similar when they share GO terms: ``J(a, b) = |T_a ∩ T_b| / |T_a ∪ T_b|`` (Jaccard
similarity of their GO term sets). Every gene keeps its ``top_k`` (20) most similar other genes whose
similarity is above ``threshold`` (0.1, strictly greater); the edge points from the neighbour to the
gene (``edge_index[0]`` = neighbour, ``edge_index[1]`` = gene, GEARS / torch_geometric flow
source -> target) and carries the Jaccard value as its weight. Self loops are not stored (the GNN adds
them, :func:`epiflow.model.gnn.gcn_norm`). Ties at the top-k cut are broken by gene order (stable).

Inputs: a two-column table ``gene_symbol, go_id`` (TSV, optional header, ``.gz`` allowed; e.g.
``go_bp_human.tsv.gz`` of the shared data or ``go.tsv`` of ``epiflow simulate``) or a GO annotation
file in GAF 2.x format (``!`` comment lines; symbol in column 3, GO id in column 5; rows whose
qualifier contains ``NOT`` are dropped; ``aspect`` filters column 9, default ``P`` = biological process).

Jaccard is computed with one sparse product ``M M^T`` of the binary gene x term matrix, in row blocks,
so 19,000 genes x 12,000 terms take seconds.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputFormatError, decompression_errors

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.1
DEFAULT_TOP_K = 20


@dataclass
class GeneGraph:
    """Genes (node order), directed edges neighbour -> gene, Jaccard weights."""

    genes: list[str]
    edge_index: np.ndarray     # [2, E] int64: row 0 = neighbour (source), row 1 = gene (target)
    edge_weight: np.ndarray    # [E] float32 Jaccard similarity

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def index(self) -> dict[str, int]:
        return {g: i for i, g in enumerate(self.genes)}

    def neighbours(self, gene: str) -> pd.DataFrame:
        """The neighbours of ``gene`` (columns gene, jaccard), most similar first."""
        i = self.index()[gene]
        sel = self.edge_index[1] == i
        df = pd.DataFrame({"gene": np.asarray(self.genes, dtype=object)[self.edge_index[0, sel]],
                           "jaccard": self.edge_weight[sel]})
        return df.sort_values("jaccard", ascending=False, kind="stable").reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        g = np.asarray(self.genes, dtype=object)
        return pd.DataFrame({"gene": g[self.edge_index[1]], "neighbour": g[self.edge_index[0]],
                             "jaccard": self.edge_weight})

    def subgraph(self, genes) -> "GeneGraph":
        """Restrict to ``genes`` (kept in the given order; genes absent from the graph become isolated nodes)."""
        genes = [str(g) for g in genes]
        pos = {g: i for i, g in enumerate(genes)}
        old = np.asarray([pos.get(g, -1) for g in self.genes], dtype=np.int64)
        src, dst = old[self.edge_index[0]], old[self.edge_index[1]]
        keep = (src >= 0) & (dst >= 0)
        return GeneGraph(genes, np.stack([src[keep], dst[keep]]).astype(np.int64), self.edge_weight[keep])


# ----------------------------------------------------------------------------- reading
def _open_text(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rt") if magic == b"\x1f\x8b" else open(path, "rt")


def read_go_annotations(path: str | os.PathLike, *, aspect: str | None = "P") -> pd.DataFrame:
    """GO annotations as a frame ``gene, go_id`` (de-duplicated), from a 2-column TSV or a GAF file."""
    path = Path(path)
    if not path.exists():
        raise InputFormatError("GO annotation file not found", path=str(path),
                               fix="pass a TSV gene_symbol<TAB>go_id (e.g. ../shared/data/go_bp_human.tsv.gz) or a GAF file")
    with decompression_errors(path, "GO annotation file"):
        return _read_go_annotations(path, aspect)


def _read_go_annotations(path: Path, aspect: str | None) -> pd.DataFrame:
    with _open_text(path) as fh:
        first = ""
        for line in fh:
            if line.strip():
                first = line
                break
    is_gaf = first.startswith("!gaf") or first.startswith("!")
    if is_gaf:
        rows = []
        with _open_text(path) as fh:
            for ln, line in enumerate(fh, 1):
                if not line.strip() or line.startswith("!"):
                    continue
                f = line.rstrip("\n").split("\t")
                if len(f) < 9:
                    raise InputFormatError(f"GAF line has {len(f)} columns, expected >= 15 (at least 9)",
                                           path=str(path), line=ln, fix="pass a GAF 2.x file or a 2-column TSV")
                if "NOT" in f[3].split("|"):
                    continue
                if aspect and f[8] != aspect:
                    continue
                rows.append((f[2], f[4]))
        df = pd.DataFrame(rows, columns=["gene", "go_id"])
    else:
        df = pd.read_csv(path, sep="\t", header=None, dtype=str, comment="#", usecols=[0, 1],
                         names=["gene", "go_id"], keep_default_na=False)
        if len(df) and not str(df.iloc[0, 1]).upper().startswith("GO:"):
            df = df.iloc[1:]  # header line
        bad = ~df["go_id"].str.upper().str.startswith("GO:")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputFormatError(f"column 2 should hold GO ids (GO:NNNNNNN), found {df['go_id'].iloc[i]!r}",
                                   path=str(path), line=i + 2, field="go_id",
                                   fix="pass a TSV gene_symbol<TAB>go_id (header optional) or a GAF file")
    df = df[(df["gene"] != "") & (df["go_id"] != "")].drop_duplicates().reset_index(drop=True)
    if df.empty:
        raise InputFormatError("no GO annotations read", path=str(path),
                               fix="check the file (and the aspect filter for GAF files)")
    return df


# ----------------------------------------------------------------------------- graph
def jaccard_top_k(membership: sp.csr_matrix, *, threshold: float = DEFAULT_THRESHOLD, top_k: int = DEFAULT_TOP_K,
                  block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Edges (neighbour -> gene) of the top-k Jaccard neighbours above ``threshold`` from a binary
    genes x terms matrix. Returns ``edge_index`` [2, E] and weights [E]."""
    m = sp.csr_matrix(membership, dtype=np.float32)
    m.data[:] = 1.0
    m.sum_duplicates()
    m.data[:] = 1.0
    n = m.shape[0]
    size = np.asarray(m.sum(1)).ravel()
    mt = m.T.tocsc()
    srcs, dsts, ws = [], [], []
    for a in range(0, n, block):
        b = min(n, a + block)
        inter = (m[a:b] @ mt).tocoo()                      # [b-a, n] shared term counts
        r, c, v = inter.row, inter.col, inter.data
        gene = r + a
        keep = gene != c
        gene, c, v = gene[keep], c[keep], v[keep]
        jac = v / (size[gene] + size[c] - v)
        keep = jac > threshold
        gene, c, jac = gene[keep], c[keep], jac[keep]
        if gene.size == 0:
            continue
        order = np.lexsort((c, -jac, gene))                 # per gene: most similar first, ties by index
        gene, c, jac = gene[order], c[order], jac[order]
        starts = np.flatnonzero(np.r_[True, gene[1:] != gene[:-1]])
        rank = np.arange(gene.size) - np.repeat(starts, np.diff(np.r_[starts, gene.size]))
        keep = rank < top_k
        srcs.append(c[keep])
        dsts.append(gene[keep])
        ws.append(jac[keep].astype(np.float32))
    if not srcs:
        return np.zeros((2, 0), np.int64), np.zeros(0, np.float32)
    return (np.stack([np.concatenate(srcs), np.concatenate(dsts)]).astype(np.int64),
            np.concatenate(ws).astype(np.float32))


def build_gene_graph(go, *, genes=None, threshold: float = DEFAULT_THRESHOLD, top_k: int = DEFAULT_TOP_K,
                     aspect: str | None = "P") -> GeneGraph:
    """GEARS-style gene graph from GO annotations (a path or a ``gene, go_id`` frame).

    ``genes``: optional node list, in that order; neighbours are then searched among these genes
    only (genes without annotation become isolated nodes). Without ``genes`` every annotated gene
    is a node (sorted by name).
    """
    df = read_go_annotations(go, aspect=aspect) if not isinstance(go, pd.DataFrame) else go
    if not {"gene", "go_id"} <= set(df.columns):
        df = df.rename(columns={df.columns[0]: "gene", df.columns[1]: "go_id"})
    if genes is None:
        genes = sorted(df["gene"].astype(str).unique())
    else:
        genes = list(dict.fromkeys(str(g) for g in genes))
    gpos = {g: i for i, g in enumerate(genes)}
    df = df[df["gene"].astype(str).isin(gpos)]
    terms, tcode = np.unique(df["go_id"].astype(str).to_numpy(), return_inverse=True)
    rows = np.fromiter((gpos[g] for g in df["gene"].astype(str)), dtype=np.int64, count=len(df))
    m = sp.csr_matrix((np.ones(len(df), np.float32), (rows, tcode)), shape=(len(genes), len(terms)))
    n_annot = int((np.diff(m.indptr) > 0).sum())
    if n_annot < len(genes):
        log.warning("%d of %d genes have no GO annotation: they are isolated nodes of the gene graph",
                    len(genes) - n_annot, len(genes))
    ei, ew = jaccard_top_k(m, threshold=threshold, top_k=top_k)
    log.info("gene graph: %d genes, %d GO terms, %d edges (Jaccard > %g, top %d)", len(genes), len(terms),
             ei.shape[1], threshold, top_k)
    return GeneGraph(genes, ei, ew)


def write_gene_graph(graph: GeneGraph, path) -> Path:
    """Edge list TSV (gene, neighbour, jaccard), written atomically."""
    from ..io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        graph.to_frame().to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    return path
