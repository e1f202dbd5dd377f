"""Gene-perturbation GNN (SPEC §5, unseen genetic perturbation).

One learnable token per gene, propagated once over a GEARS-style gene graph with an SGConv-style
layer (K = 1: symmetric-normalised adjacency with self loops, then a linear map) and a LayerNorm.
The output row of a perturbed gene (summed over the genes of a combinatorial perturbation) is the
conditional token added at position 0 of the cell's input. Pure torch ops; the graph is stored in
the state dict (``edge_index`` [2, E], ``edge_weight`` [E]) so a checkpoint is self-contained.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError


def gcn_norm(edge_index: torch.Tensor, edge_weight: torch.Tensor | None, num_nodes: int):
    """Edges ``(src, dst, weight)`` of ``D^-1/2 (A + I) D^-1/2`` with remaining self loops of weight 1.

    Existing self loops keep their weight; the degree is summed over incoming edges (target side),
    as in torch_geometric's ``gcn_norm`` (flow source -> target).
    """
    src, dst = edge_index[0].long(), edge_index[1].long()
    w = torch.ones(src.numel(), device=src.device) if edge_weight is None else edge_weight
    w = w.to(torch.get_default_dtype() if not w.is_floating_point() else w.dtype)
    is_loop = src == dst
    loop_w = torch.ones(num_nodes, dtype=w.dtype, device=w.device)
    loop_w[src[is_loop]] = w[is_loop]
    keep = ~is_loop
    nodes = torch.arange(num_nodes, device=src.device)
    src = torch.cat([src[keep], nodes])
    dst = torch.cat([dst[keep], nodes])
    w = torch.cat([w[keep], loop_w])
    deg = torch.zeros(num_nodes, dtype=w.dtype, device=w.device).index_add_(0, dst, w)
    dinv = deg.pow(-0.5)
    dinv = torch.where(torch.isinf(dinv), torch.zeros_like(dinv), dinv)
    return src, dst, dinv[src] * w * dinv[dst]


class PerturbationGNN(nn.Module):
    """Gene tokens -> one SGConv (K=1) propagation -> LayerNorm."""

    def __init__(self, num_genes: int, dim: int, num_edges: int = 0, ln_eps: float = 1e-5):
        super().__init__()
        self.num_genes = int(num_genes)
        self.gene_embedding = nn.Embedding(num_genes, dim)
        self.lin = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.register_buffer("edge_index", torch.zeros(2, num_edges, dtype=torch.int64))
        self.register_buffer("edge_weight", torch.ones(num_edges))

    def set_graph(self, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None) -> None:
        """Replace the gene graph (``edge_index`` [2, E] of gene indices, optional weights [E])."""
        ei = torch.as_tensor(edge_index, dtype=torch.int64, device=self.gene_embedding.weight.device)
        if ei.ndim != 2 or ei.shape[0] != 2:
            raise ConfigError(f"edge_index must have shape [2, E], got {list(ei.shape)}", field="edge_index")
        if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= self.num_genes):
            raise ConfigError(f"edge_index refers to genes outside 0..{self.num_genes - 1}", field="edge_index")
        ew = (torch.ones(ei.shape[1]) if edge_weight is None
              else torch.as_tensor(edge_weight, dtype=torch.float32)).to(ei.device)
        if ew.shape != (ei.shape[1],):
            raise ConfigError(f"edge_weight must have shape [{ei.shape[1]}], got {list(ew.shape)}",
                              field="edge_weight")
        self.edge_index = ei
        self.edge_weight = ew

    def node_embeddings(self) -> torch.Tensor:
        """``LayerNorm(Lin(Â X))`` for all genes, ``[num_genes, dim]``."""
        x = self.gene_embedding.weight
        src, dst, norm = gcn_norm(self.edge_index, self.edge_weight, self.num_genes)
        # index_select, not x[src]: the backward of advanced indexing (index_put_ with
        # accumulate) adds rows with parallel atomic float adds on CPU with >= 2 threads, so
        # fine-tuning differed from run to run; index_select's backward (index_add_) sums in order.
        msg = x.index_select(0, src) * norm.to(x.dtype)[:, None]
        agg = torch.zeros_like(x).index_add(0, dst, msg)
        return self.norm(self.lin(agg))

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        """``genes``: LongTensor ``[B]`` or ``[B, k]`` of perturbed gene indices, -1 = none.

        Returns ``[B, dim]``: the sum of the GNN outputs of each cell's genes (zeros for controls).
        """
        genes = torch.as_tensor(genes, device=self.gene_embedding.weight.device)
        if genes.ndim == 1:
            genes = genes[:, None]
        emb = self.node_embeddings()
        valid = genes >= 0
        rows = emb.index_select(0, genes.clamp(min=0).reshape(-1)).reshape(*genes.shape, -1)
        rows = rows * valid[..., None].to(emb.dtype)
        return rows.sum(1)
