"""Memory-lean training of the two huge tables (cCRE embedding, signal decoder).

At paper scale the cCRE embedding (1,355,449 x 512) and the signal decoder (1,355,445 x 512) hold
1.39 B of the 1.45 B parameters; dense fp32 AdamW keeps parameters + gradients + two moments =
16 bytes per parameter (~23 GB). The lean mode keeps only the fp32 parameters of those tables:

* **embedding**: sparse gradients (``nn.Embedding(sparse=True)``; the input tokens and the CCA
  queries touch a few thousand rows per step) and a lazy :class:`RowwiseAdamW` update;
* **decoder**: the SR loss is computed chunk by chunk over the vocabulary by
  :class:`ChunkedSRLoss`, whose backward returns the gradient of the cell embeddings and stores the
  decoder's weight gradient as low-rank factors ``(G, H)`` (``dW = G^T H``, ``G`` = dLoss/dlogits
  ``[cells, N]``, ``H`` = cell embeddings ``[cells, D]``) instead of a dense ``[N, D]`` tensor;
  :meth:`RowwiseAdamW.step_lowrank` applies it chunk by chunk. The bias keeps a normal dense gradient.

In DDP both tables are excluded from DDP's all-reduce; :meth:`LeanTables.sync` all-gathers the
sparse rows and the factors (a few MB) instead of all-reducing 5.6 GB of dense gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .optim import RowwiseAdamW


class FactorStore:
    """Accumulates the low-rank factors of the decoder gradient over the micro-batches of a step."""

    def __init__(self):
        self.G: list[torch.Tensor] = []
        self.H: list[torch.Tensor] = []

    def add(self, G: torch.Tensor, H: torch.Tensor) -> None:
        self.G.append(G)
        self.H.append(H)

    def clear(self) -> None:
        self.G, self.H = [], []

    def cat(self):
        if not self.G:
            return None, None
        return torch.cat(self.G, 0), torch.cat(self.H, 0)


class ChunkedSRLoss(torch.autograd.Function):
    """Sum over all ``B x N`` entries of BCE-with-logits(pos_weight) of ``h W^T + b``, chunked over N.

    Never materialises the dense weight gradient: backward stores ``(dL/dlogits, h)`` in ``store``.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, pos_rows, pos_cols, pos_weight: float, store: FactorStore, chunk: int):
        hf = h.float()
        total = hf.new_zeros(())
        n = weight.shape[0]
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            x = hf @ weight[a:b].float().t() + bias[a:b].float()
            total = total + F.softplus(x).sum()
        if pos_rows.numel():
            xp = (hf[pos_rows] * weight[pos_cols].float()).sum(-1) + bias[pos_cols].float()
            total = total + (pos_weight * F.softplus(-xp) - F.softplus(xp)).sum()
        ctx.save_for_backward(h, weight, bias, pos_rows, pos_cols)
        ctx.pos_weight, ctx.store, ctx.chunk = float(pos_weight), store, int(chunk)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, pos_rows, pos_cols = ctx.saved_tensors
        hf = h.float()
        n = weight.shape[0]
        go = grad_out.float()
        # dL/dx = sigmoid(x) for every entry, plus for positives: -(p * sigmoid(-x) + sigmoid(x))
        G = torch.empty(h.shape[0], n, dtype=torch.float32, device=h.device)
        for a in range(0, n, ctx.chunk):
            b = min(n, a + ctx.chunk)
            G[:, a:b] = torch.sigmoid(hf @ weight[a:b].float().t() + bias[a:b].float())
        if pos_rows.numel():
            xp = (hf[pos_rows] * weight[pos_cols].float()).sum(-1) + bias[pos_cols].float()
            G[pos_rows, pos_cols] = G[pos_rows, pos_cols] - (ctx.pos_weight * torch.sigmoid(-xp) + torch.sigmoid(xp))
        G.mul_(go)
        grad_h = torch.zeros_like(hf)
        for a in range(0, n, ctx.chunk):
            b = min(n, a + ctx.chunk)
            grad_h += G[:, a:b] @ weight[a:b].float()
        ctx.store.add(G, hf.detach())
        grad_bias = G.sum(0).to(bias.dtype)
        return grad_h.to(h.dtype), None, grad_bias, None, None, None, None, None


def chunked_sr_loss_sum(h, weight, bias, pos_rows, pos_cols, pos_weight, store, chunk: int = 65536):
    return ChunkedSRLoss.apply(h, weight, bias, pos_rows, pos_cols, float(pos_weight), store, int(chunk))


def _all_gather_padded(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension differs between ranks."""
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))
    pad = t.new_zeros((m,) + tuple(t.shape[1:]))
    pad[: t.shape[0]] = t
    out = [torch.zeros_like(pad) for _ in range(world)]
    dist.all_gather(out, pad)
    return [o[: int(s)] for o, s in zip(out, sizes)]


class LeanTables:
    """Owns the row-wise optimisers of the embedding and decoder weights in memory-lean mode."""

    def __init__(self, model, lr_source, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 momentum: bool = False, chunk: int = 65536):
        self.model = model
        self.embedding = model.cCRE_embedding
        self.embedding.sparse = True
        self.decoder = getattr(model, "signal_decoder", None)
        self.store = FactorStore()
        self.chunk = int(chunk)
        self.emb_opt = RowwiseAdamW(self.embedding.weight, lr_source, betas=betas, eps=eps,
                                    weight_decay=weight_decay, momentum=momentum)
        self.dec_opt = None
        if self.decoder is not None:
            self.dec_opt = RowwiseAdamW(self.decoder.weight, lr_source, betas=betas, eps=eps,
                                        weight_decay=weight_decay, momentum=momentum)

    def param_names(self) -> list[str]:
        names = ["cCRE_embedding.weight"]
        if self.decoder is not None:
            names.append("signal_decoder.weight")
        return names

    def params(self):
        return [self.embedding.weight] + ([self.decoder.weight] if self.decoder is not None else [])

    def sr_loss_sum(self, cell_embedding, pos_rows, pos_cols, pos_weight):
        return chunked_sr_loss_sum(cell_embedding, self.decoder.weight, self.decoder.bias, pos_rows, pos_cols,
                                   pos_weight, self.store, self.chunk)

    def sync(self, world: int) -> None:
        """Sum the lean gradients over ranks (each rank's loss is scaled by ``world``, hence / world)."""
        if world <= 1:
            return
        w = self.embedding.weight
        g = w.grad
        if g is None:  # keep the collective calls matched across ranks
            g = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long, device=w.device),
                                        w.new_zeros(0, w.shape[1]), w.shape, check_invariants=False)
        g = g.coalesce()
        n_rows = torch.tensor([g.indices().shape[1]], device=w.device)
        dist.all_reduce(n_rows)
        if int(n_rows) * 2 > w.shape[0]:
            # most rows touched (paper scale: CCA queries cover much of the vocabulary): one dense
            # all-reduce is cheaper than gathering every rank's rows
            dense = torch.zeros_like(w)
            dense.index_add_(0, g.indices()[0], g.values().to(w.dtype))
            dist.all_reduce(dense)
            dense /= world
            rows = torch.nonzero(dense.abs().sum(1) > 0).squeeze(1)
            w.grad = torch.sparse_coo_tensor(rows[None], dense[rows], w.shape, check_invariants=False,
                                             is_coalesced=True)
            del dense
        else:
            idx = torch.cat(_all_gather_padded(g.indices()[0], world))
            val = torch.cat(_all_gather_padded(g.values(), world)) / world
            w.grad = torch.sparse_coo_tensor(idx[None], val, g.shape, check_invariants=False).coalesce()
        if self.decoder is not None:
            G, H = self.store.cat()
            if G is None:
                G = self.decoder.weight.new_zeros(0, self.decoder.weight.shape[0])
                H = self.decoder.weight.new_zeros(0, self.decoder.weight.shape[1])
            G = torch.cat(_all_gather_padded(G, world)) / world
            H = torch.cat(_all_gather_padded(H, world))
            self.store.clear()
            self.store.add(G, H)

    def sq_norm(self) -> torch.Tensor:
        """Squared norm of the lean gradients (for global-norm clipping)."""
        total = torch.zeros((), dtype=torch.float32, device=self.embedding.weight.device)
        g = self.embedding.weight.grad
        if g is not None:
            total = total + g.coalesce().values().float().pow(2).sum()
        G, H = self.store.cat()
        if G is not None:
            # ||G^T H||_F^2 = sum((G G^T) * (H H^T))
            total = total + ((G @ G.t()) * (H @ H.t())).sum()
        return total

    def scale_(self, coef: float) -> None:
        g = self.embedding.weight.grad
        if g is not None:
            self.embedding.weight.grad = g.coalesce() * coef
        self.store.G = [G * coef for G in self.store.G]

    def step(self) -> None:
        self.emb_opt.begin_step()
        g = self.embedding.weight.grad
        if g is not None:
            self.emb_opt.step_sparse(g)
        self.embedding.weight.grad = None
        if self.dec_opt is not None:
            self.dec_opt.begin_step()
            G, H = self.store.cat()
            if G is not None:
                self.dec_opt.step_lowrank(G, H, self.chunk)
            self.store.clear()

    def state_dict(self) -> dict:
        return {"emb": self.emb_opt.state_dict(), "dec": None if self.dec_opt is None else self.dec_opt.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.emb_opt.load_state_dict(sd["emb"])
        if self.dec_opt is not None and sd.get("dec") is not None:
            self.dec_opt.load_state_dict(sd["dec"])

    def state_bytes(self) -> int:
        return self.emb_opt.state_bytes() + (0 if self.dec_opt is None else self.dec_opt.state_bytes())
