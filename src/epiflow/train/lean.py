"""Memory-lean training of the two huge tables (cCRE embedding, signal decoder).

At paper scale the cCRE embedding (1,355,449 x 512) and the signal decoder (1,355,445 x 512) hold
1.39 B of the 1.45 B parameters; dense fp32 AdamW keeps parameters + gradients + two moments =
16 bytes per parameter (~23 GB). The lean mode keeps the fp32 parameters of those tables, a
row-wise AdamW state (one fp32 second moment per row, :class:`~epiflow.train.optim.RowwiseAdamW`)
and **no gradient tensor of the tables' size**: the gradient of the step is rebuilt chunk by chunk
of rows (``chunk`` rows at a time) from small per-step records when the norm is taken and again
when the rows are updated.

* **SR / signal decoder**: the loss is computed chunk by chunk over the vocabulary by
  :class:`ChunkedSRLoss`; its backward returns the gradients of the cell embeddings and of the
  bias and records only ``(h, positives, dLoss/dsum)``. The weight gradient of a row chunk is
  ``G_c^T h`` with ``G_c = dLoss/dlogits`` of the chunk, recomputed from those records (the
  weights do not change between the forward and the update).
* **CCA / embedding rows of the queried cCREs**: the CCA head reads the embedding of each queried
  cCRE (all accessible cCREs of a cell plus K times as many negatives: at paper scale ~15 M
  queries per step, touching every row). The forward uses a detached lookup and records
  ``(cell embeddings, query ids, labels, K, dLoss/dsum)``; the embedding gradient of a row chunk
  is recomputed from the queries whose ids fall in the chunk (the head is per query, so this is
  exact), in sub-batches of ``query_chunk`` queries.
* **input tokens**: ``nn.Embedding(sparse=True)``; after each backward the coalesced sparse
  gradient (one row per distinct input token of the micro-batch) is moved to a list, so its size
  is bounded by the micro-batch's tokens, never by the vocabulary.

The head weights and the decoder bias must still be the pre-update values when the chunks are
rebuilt: :meth:`LeanTables.step` runs **before** the dense optimiser's step. Under DDP the tables
bypass DDP's all-reduce: the decoder records are all-gathered (a few MB) and each rank rebuilds
the same decoder gradient; the touched rows of all ranks are gathered once per step, and each
embedding row chunk holding one of them (``[chunk, dim]``) is all-reduced. Global-norm clipping
includes both tables (first pass over the chunks).
:func:`memory_estimate` gives the bytes per GPU of dense AdamW versus this mode, and
:func:`activation_estimate` the encoder activations kept for the backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .objectives import bce_sum
from .optim import RowwiseAdamW


# ----------------------------------------------------------------------------- small pieces
def cca_head(model, cell_rows: torch.Tensor, emb_rows: torch.Tensor) -> torch.Tensor:
    """The CCA head of :meth:`EpiAgent.cca_logits` on given embedding rows (instead of token ids)."""
    z = torch.cat([cell_rows, emb_rows], -1)
    return model.fc2_for_CCA(model.layer_norm_for_CCA(F.gelu(model.fc1_for_CCA(z)))).squeeze(-1)


def _chunk_bounds(sorted_vals: torch.Tensor, n: int, chunk: int) -> list[int]:
    """Start offsets in a sorted 1-d tensor of the chunks ``[0, chunk), [chunk, 2 chunk), ...`` of
    ``range(n)`` plus the end (one device synchronisation for all chunks)."""
    edges = torch.arange(0, n + chunk, chunk, device=sorted_vals.device, dtype=sorted_vals.dtype)
    edges = edges.clamp(max=n)
    if sorted_vals.numel() == 0:
        return [0] * len(edges)
    return torch.searchsorted(sorted_vals, edges).tolist()


def _sr_dlogits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                pos_weight, lse: torch.Tensor | None = None, inv: torch.Tensor | None = None) -> torch.Tensor:
    """dBCE/dlogits of one column chunk: ``sigmoid(x)`` for every entry, ``-p sigmoid(-x)`` for the
    positives (``rows``, chunk-relative ``cols``); ``pos_weight`` a float or a per-row tensor.

    With ``lse`` (per-row logsumexp over ALL columns) the multinomial SR instead
    (:func:`epiflow.train.objectives.sr_multinomial_sum`): ``softmax(x) - y / L`` with ``inv`` = 1 / L
    per row."""
    x = torch.addmm(b.float(), h, w.float().t())
    if lse is not None:
        assert inv is not None
        G = torch.exp(x - lse[:, None])
        if rows.numel():
            G[rows, cols] -= inv[rows]
        return G
    G = torch.sigmoid(x)
    if rows.numel():
        p = pos_weight[rows] if torch.is_tensor(pos_weight) else pos_weight
        G[rows, cols] = -p * torch.sigmoid(-x[rows, cols])
    return G


def _sr_input_grads(hf, weight, bias, rows, cols, chunk: int, go, pos_weight, lse=None, inv=None):
    """Gradients of an SR sum w.r.t. ``h`` and the decoder bias, chunk by chunk over the vocabulary
    (``rows``/``cols`` sorted by column; ``go`` = dLoss/dsum)."""
    n = weight.shape[0]
    grad_h = torch.zeros_like(hf)
    grad_bias = torch.empty(n, dtype=torch.float32, device=hf.device)
    cb = _chunk_bounds(cols, n, chunk)
    for j, a in enumerate(range(0, n, chunk)):
        b = min(n, a + chunk)
        lo, hi = cb[j], cb[j + 1]
        G = _sr_dlogits(hf, weight[a:b], bias[a:b], rows[lo:hi], cols[lo:hi] - a, pos_weight, lse, inv)
        G.mul_(go)
        grad_h.addmm_(G, weight[a:b].float())
        grad_bias[a:b] = G.sum(0)
    return grad_h, grad_bias


class _Tap(torch.autograd.Function):
    """Identity on a scalar loss term; its backward stores dLoss/dterm in ``rec['scale']``."""

    @staticmethod
    def forward(ctx, x, rec):
        ctx.rec = rec
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.detach().float().reshape(())
        prev = ctx.rec.get("scale")
        ctx.rec["scale"] = g if prev is None else prev + g
        return g, None


def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


# ----------------------------------------------------------------------------- per-step records
class LeanStore:
    """What one optimiser step needs to rebuild the table gradients: SR records (decoder), CCA
    records (queried embedding rows) and the sparse input-token gradients of the micro-batches."""

    def __init__(self):
        self.sr: list[dict] = []
        self.cca: list[dict] = []
        self.emb: list[tuple[torch.Tensor, torch.Tensor]] = []

    def clear(self) -> None:
        self.sr, self.cca, self.emb = [], [], []

    def nbytes(self) -> int:
        skip = ("weight", "bias", "autocast")  # parameters / settings, not step buffers
        recs = [{k: v for k, v in r.items() if k not in skip} for r in self.sr + self.cca]
        return _nbytes(recs) + _nbytes(self.emb)

    def cat(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        """Dense ``(G, H)`` with ``dW = G^T H`` of the SR records (small problems and tests only:
        ``G`` is ``[cells, N]``). ``weight``/``bias`` default to the ones the records were made with."""
        recs = [r for r in self.sr if r.get("scale") is not None]
        if not recs:
            return None, None
        Gs, Hs = [], []
        for r in recs:
            w = weight if weight is not None else r["weight"]
            b = bias if bias is not None else r["bias"]
            G = _sr_dlogits(r["h"], w, b, r["rows"], r["cols"], r["pw"], r.get("lse"), r.get("inv")) * r["scale"]
            Gs.append(G)
            Hs.append(r["h"])
        return torch.cat(Gs, 0), torch.cat(Hs, 0)


FactorStore = LeanStore  # earlier name


class ChunkedSRLoss(torch.autograd.Function):
    """Sum over all ``B x N`` entries of BCE-with-logits(pos_weight) of ``h W^T + b``, chunked over N.

    Never materialises a ``[B, N]`` or ``[N, D]`` tensor: backward returns the gradients of ``h``
    and ``b`` and appends ``(h, positives, pos_weight, dLoss/dsum)`` to ``store.sr``; the weight
    gradient is rebuilt chunk by chunk at the optimiser step.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, pos_rows, pos_cols, pos_weight: float, store: LeanStore, chunk: int):
        hf = h.float()
        n = weight.shape[0]
        order = torch.argsort(pos_cols, stable=True)
        rows, cols = pos_rows[order], pos_cols[order]
        total = hf.new_zeros(())
        cb = _chunk_bounds(cols, n, chunk)
        for j, a in enumerate(range(0, n, chunk)):
            b = min(n, a + chunk)
            x = torch.addmm(bias[a:b].float(), hf, weight[a:b].float().t())
            total = total + F.softplus(x).sum()
            lo, hi = cb[j], cb[j + 1]
            if hi > lo:
                xp = x[rows[lo:hi], cols[lo:hi] - a]
                total = total + (pos_weight * F.softplus(-xp) - F.softplus(xp)).sum()
        ctx.save_for_backward(h, weight, bias, rows, cols)
        ctx.pos_weight, ctx.store, ctx.chunk = float(pos_weight), store, int(chunk)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, rows, cols = ctx.saved_tensors
        hf = h.float().detach()
        go = grad_out.detach().float().reshape(())
        grad_h, grad_bias = _sr_input_grads(hf, weight, bias, rows, cols, ctx.chunk, go, ctx.pos_weight)
        ctx.store.sr.append({"h": hf, "rows": rows, "cols": cols, "pw": ctx.pos_weight, "scale": go,
                             "weight": weight, "bias": bias})
        return grad_h.to(h.dtype), None, grad_bias.to(bias.dtype), None, None, None, None, None


def chunked_sr_loss_sum(h, weight, bias, pos_rows, pos_cols, pos_weight, store, chunk: int = 65536):
    return ChunkedSRLoss.apply(h, weight, bias, pos_rows, pos_cols, float(pos_weight), store, int(chunk))


class ChunkedMultinomialSR(torch.autograd.Function):
    """The multinomial SR (:func:`epiflow.train.objectives.sr_multinomial_sum`) of ``h W^T + b``,
    chunked over N like :class:`ChunkedSRLoss`: a first pass over the chunks gives each row's
    logsumexp, the positives' logits are gathered on the way; backward returns the gradients of ``h``
    and ``b`` and records ``(h, positives, lse, 1/L)`` for the weight gradient at the step."""

    @staticmethod
    def forward(ctx, h, weight, bias, pos_rows, pos_cols, store: LeanStore, chunk: int):
        hf = h.float()
        n, B = weight.shape[0], h.shape[0]
        order = torch.argsort(pos_cols, stable=True)
        rows, cols = pos_rows[order], pos_cols[order]
        lse = hf.new_full((B,), float("-inf"))
        xpos = hf.new_empty(rows.shape[0])
        cb = _chunk_bounds(cols, n, chunk)
        for j, a in enumerate(range(0, n, chunk)):
            b = min(n, a + chunk)
            x = torch.addmm(bias[a:b].float(), hf, weight[a:b].float().t())
            lse = torch.logaddexp(lse, torch.logsumexp(x, 1))
            lo, hi = cb[j], cb[j + 1]
            if hi > lo:
                xpos[lo:hi] = x[rows[lo:hi], cols[lo:hi] - a]
        counts = torch.bincount(rows, minlength=B)
        inv = 1.0 / counts.clamp_min(1).to(hf.dtype)
        total = (inv[rows] * (lse[rows] - xpos)).sum()
        # a row without positives adds nothing, its softmax term neither: lse = inf makes its gradient 0
        lse = torch.where(counts > 0, lse, torch.full_like(lse, float("inf")))
        ctx.save_for_backward(h, weight, bias, rows, cols, lse, inv)
        ctx.store, ctx.chunk = store, int(chunk)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, rows, cols, lse, inv = ctx.saved_tensors
        hf = h.float().detach()
        go = grad_out.detach().float().reshape(())
        grad_h, grad_bias = _sr_input_grads(hf, weight, bias, rows, cols, ctx.chunk, go, 0.0, lse, inv)
        ctx.store.sr.append({"h": hf, "rows": rows, "cols": cols, "pw": 0.0, "scale": go, "weight": weight,
                             "bias": bias, "lse": lse, "inv": inv})
        return grad_h.to(h.dtype), None, grad_bias.to(bias.dtype), None, None, None, None


def chunked_sr_multinomial_sum(h, weight, bias, pos_rows, pos_cols, store, chunk: int = 65536):
    return ChunkedMultinomialSR.apply(h, weight, bias, pos_rows, pos_cols, store, int(chunk))


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


# ----------------------------------------------------------------------------- the tables
# rows per chunk of the table passes and CCA queries per recomputed sub-batch, by device type. On CUDA
# every chunk costs a few dozen kernel launches per pass (SR forward and backward, the norm pass, the
# update pass): at 16,384 rows the paper's tables take 83 chunks per pass and the H200 sat idle for
# ~80 % of a lean pretraining step, waiting for the host. On the H200 (benchmarks/README.md, GPU
# results) memory-lean pretraining of the paper model ran at 33,546 / 41,904 / 53,387 tokens/s with
# chunks of 16,384 / 32,768 / 65,536 rows (dense AdamW: 65,797), at the same peak memory: the chunk
# buffers exist only at the step, after the activations are freed. At 65,536 rows they take ~0.4 GB
# (dim 512; memory_estimate's chunk_workspace), and the analytic lean state of the paper's setup
# stays under its 7.74 GB per GPU.
CHUNKS = {"cpu": (16384, 4096), "cuda": (65536, 8192)}


def default_chunks(device) -> tuple[int, int]:
    """``(chunk, query_chunk)`` of :class:`LeanTables` for a device (``lean_chunk`` 0 = this)."""
    kind = torch.device(device).type if device is not None else "cpu"
    return CHUNKS.get(kind, CHUNKS["cpu"])


class LeanTables:
    """Row-wise optimisers and chunked gradients of the embedding and decoder weights (lean mode).

    Use: build after the model (it switches the embedding to sparse gradients and hooks it); in the
    forward call :meth:`sr_loss_sum` and :meth:`cca_loss_sum` instead of the dense heads; after the
    micro-batches of a step call :meth:`sync` (every rank), then :meth:`sq_norm` / :meth:`scale_`
    for clipping, then :meth:`step` **before** the dense optimiser's step.
    """

    def __init__(self, model, lr_source, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 momentum: bool = False, chunk: int | None = None, query_chunk: int | None = None):
        self.model = model
        self.embedding = model.cCRE_embedding
        self.embedding.sparse = True
        self.decoder = getattr(model, "signal_decoder", None)
        self.store = LeanStore()
        auto_chunk, auto_query = default_chunks(self.embedding.weight.device)
        self.chunk = max(1, int(chunk or auto_chunk))
        self.query_chunk = max(1, int(query_chunk or auto_query))
        self.emb_opt = RowwiseAdamW(self.embedding.weight, lr_source, betas=betas, eps=eps,
                                    weight_decay=weight_decay, momentum=momentum)
        self.dec_opt = None
        if self.decoder is not None:
            self.dec_opt = RowwiseAdamW(self.decoder.weight, lr_source, betas=betas, eps=eps,
                                        weight_decay=weight_decay, momentum=momentum)
        self._world = 1
        self._coef = 1.0
        self._prep: dict[str, Any] | None = None
        self.peak_store_bytes = 0
        self._hook = self.embedding.weight.register_post_accumulate_grad_hook(self._collect)

    def close(self) -> None:
        """Remove the gradient hook (the model trains densely again)."""
        self._hook.remove()

    def param_names(self) -> list[str]:
        names = ["cCRE_embedding.weight"]
        if self.decoder is not None:
            names.append("signal_decoder.weight")
        return names

    def params(self):
        return [self.embedding.weight] + ([self.decoder.weight] if self.decoder is not None else [])

    # ------------------------------------------------------------------ forward side
    def _collect(self, p) -> None:
        """After each backward: move the input-token gradient (sparse) off ``.grad``, coalesced."""
        g = p.grad
        p.grad = None
        if g is None:
            return
        if not g.is_sparse:  # defensive: a dense gradient -> its non-zero rows
            rows = torch.nonzero(g.abs().sum(1) > 0).squeeze(1)
            self.store.emb.append((rows, g[rows].contiguous()))
            return
        g = g.coalesce()
        self.store.emb.append((g.indices()[0], g.values()))

    def sr_loss_sum(self, cell_embedding, pos_rows, pos_cols, pos_weight):
        return chunked_sr_loss_sum(cell_embedding, self.decoder.weight, self.decoder.bias, pos_rows, pos_cols,
                                   pos_weight, self.store, self.chunk)

    def sr_multinomial_sum(self, cell_embedding, pos_rows, pos_cols):
        return chunked_sr_multinomial_sum(cell_embedding, self.decoder.weight, self.decoder.bias, pos_rows, pos_cols,
                                          self.store, self.chunk)

    def cca_loss_sum(self, cell: torch.Tensor, q_cell: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                     pos_weight: float, autocast_dtype=None) -> torch.Tensor:
        """Sum of BCE-with-logits(pos_weight) of the CCA head; the queried embedding rows get their
        gradient at the step (recomputed), not through autograd."""
        dev = cell.device
        ids = ids.long()
        emb = F.embedding(ids, self.embedding.weight.detach())
        with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = cca_head(self.model, cell.index_select(0, q_cell), emb)  # deterministic backward (see pretrain)
        rec = {"cell": cell.detach(), "q_cell": q_cell, "ids": ids, "labels": labels, "pw": float(pos_weight),
               "autocast": autocast_dtype, "scale": None}
        self.store.cca.append(rec)
        return _Tap.apply(bce_sum(logits, labels, pos_weight=float(pos_weight)), rec)

    # ------------------------------------------------------------------ step side
    def sync(self, world: int) -> None:
        """Gather the decoder records of all ranks (each rank's loss is scaled by ``world``, hence the
        division by ``world`` when the gradients are rebuilt). Call on every rank."""
        self._world = int(world)
        self._prep = None
        self.peak_store_bytes = max(self.peak_store_bytes, self.store.nbytes())

    def _prepare(self) -> dict:
        if self._prep is not None:
            return self._prep
        W = self.embedding.weight
        dev = W.device
        # CCA queries sorted by id (per record)
        cca = []
        for r in self.store.cca:
            if r.get("scale") is None:
                continue
            order = torch.argsort(r["ids"], stable=True)
            cca.append({**r, "order": order, "sorted": r["ids"][order]})
        V = W.shape[0]
        for r in cca:
            r["bounds"] = _chunk_bounds(r["sorted"], V, self.chunk)
        # the rows with a gradient this step (input tokens and CCA queries of every rank), sorted: the
        # update touches only these (lazy, as SparseAdam), and chunks without any are skipped
        parts = [idx for idx, _ in self.store.emb] + [r["ids"] for r in cca]
        touched = torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long, device=dev)
        if self._world > 1:
            touched = torch.unique(torch.cat(_all_gather_padded(touched, self._world)))
        prep: dict[str, Any] = {"cca": cca, "dec": None, "touched": touched,
                                "touched_bounds": _chunk_bounds(touched, V, self.chunk),
                                "emb_bounds": [_chunk_bounds(idx, V, self.chunk) for idx, _ in self.store.emb]}
        if self.decoder is not None:
            D = self.decoder.weight.shape[1]
            recs = [r for r in self.store.sr if r.get("scale") is not None]
            if recs:
                H = torch.cat([r["h"] for r in recs], 0)
                scale = torch.cat([r["scale"].expand(r["h"].shape[0]) for r in recs])
                pw = torch.cat([torch.full((r["h"].shape[0],), r["pw"], device=dev) for r in recs])
                multi = [r.get("lse") is not None for r in recs]
                if any(multi) and not all(multi):
                    raise RuntimeError("one optimiser step mixes the BCE and the multinomial SR")
                lse = torch.cat([r["lse"] for r in recs]) if all(multi) else None
                inv = torch.cat([r["inv"] for r in recs]) if all(multi) else None
                row_parts, col_parts, o = [], [], 0
                for r in recs:
                    row_parts.append(r["rows"] + o)
                    col_parts.append(r["cols"])
                    o += r["h"].shape[0]
                rows, cols = torch.cat(row_parts), torch.cat(col_parts)
            else:
                H = W.new_zeros(0, D, dtype=torch.float32)
                scale = pw = W.new_zeros(0, dtype=torch.float32)
                lse = inv = None
                rows = cols = torch.zeros(0, dtype=torch.long, device=dev)
            if self._world > 1:
                Hs = _all_gather_padded(H, self._world)
                sizes = [int(h.shape[0]) for h in Hs]
                H = torch.cat(Hs)
                scale = torch.cat(_all_gather_padded(scale, self._world)) / self._world
                pw = torch.cat(_all_gather_padded(pw, self._world))
                if lse is not None:
                    assert inv is not None
                    lse = torch.cat(_all_gather_padded(lse, self._world))
                    inv = torch.cat(_all_gather_padded(inv, self._world))
                rs = _all_gather_padded(rows, self._world)
                starts = [0]
                for s in sizes[:-1]:
                    starts.append(starts[-1] + s)
                rows = torch.cat([r + s for r, s in zip(rs, starts)])
                cols = torch.cat(_all_gather_padded(cols, self._world))
            if H.shape[0]:
                order = torch.argsort(cols, stable=True)
                cols = cols[order]
                prep["dec"] = {"H": H, "scale": scale, "pw": pw, "lse": lse, "inv": inv, "rows": rows[order], "cols": cols,
                               "bounds": _chunk_bounds(cols, self.decoder.weight.shape[0], self.chunk)}
        self._prep = prep
        return prep

    def _emb_chunks(self):
        """Yield ``(rows, grad_rows)`` of the embedding, row chunk by row chunk (global, averaged)."""
        W = self.embedding.weight
        V, D = W.shape
        prep = self._prepare()
        touched, tb = prep["touched"], prep["touched_bounds"]
        for j, a in enumerate(range(0, V, self.chunk)):
            if tb[j + 1] == tb[j]:  # no row of this chunk has a gradient on any rank
                continue
            b = min(V, a + self.chunk)
            g = torch.zeros(b - a, D, dtype=torch.float32, device=W.device)
            for (idx, val), eb in zip(self.store.emb, prep["emb_bounds"]):
                lo, hi = eb[j], eb[j + 1]
                if hi > lo:
                    g.index_add_(0, idx[lo:hi] - a, val[lo:hi].float())
            for r in prep["cca"]:
                lo, hi = r["bounds"][j], r["bounds"][j + 1]
                for s in range(lo, hi, self.query_chunk):
                    sel = r["order"][s:min(hi, s + self.query_chunk)]
                    ids = r["ids"][sel]
                    q = W.detach()[ids].requires_grad_(True)
                    with torch.enable_grad():
                        with torch.autocast(W.device.type, dtype=r["autocast"], enabled=r["autocast"] is not None):
                            logits = cca_head(self.model, r["cell"][r["q_cell"][sel]], q)
                        loss = bce_sum(logits, r["labels"][sel], pos_weight=r["pw"]) * r["scale"]
                        (gq,) = torch.autograd.grad(loss, q)
                    g.index_add_(0, ids - a, gq.float())
            if self._world > 1:
                dist.all_reduce(g)
                g.div_(self._world)
            rows = touched[tb[j]:tb[j + 1]]
            yield rows, g[rows - a]

    def _dec_chunks(self):
        """Yield ``(a, b, dW[a:b])`` of the decoder weight, chunk by chunk (global)."""
        prep = self._prepare()
        d = prep["dec"]
        if d is None:
            return
        Wd, bd = self.decoder.weight, self.decoder.bias
        n = Wd.shape[0]
        for j, a in enumerate(range(0, n, self.chunk)):
            b = min(n, a + self.chunk)
            lo, hi = d["bounds"][j], d["bounds"][j + 1]
            G = _sr_dlogits(d["H"], Wd[a:b].detach(), bd[a:b].detach(), d["rows"][lo:hi], d["cols"][lo:hi] - a,
                            d["pw"], d["lse"], d["inv"])
            G.mul_(d["scale"][:, None])
            yield a, b, G.t() @ d["H"]

    @torch.no_grad()
    def sq_norm(self) -> torch.Tensor:
        """Squared norm of the table gradients of this step (for global-norm clipping; a full pass)."""
        total = torch.zeros((), dtype=torch.float32, device=self.embedding.weight.device)
        for _, g in self._emb_chunks():
            total += g.pow(2).sum()
        for _, _, dW in self._dec_chunks():
            total += dW.pow(2).sum()
        return total

    def scale_(self, coef: float) -> None:
        self._coef *= float(coef)

    @torch.no_grad()
    def table_grads(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense gradients of the embedding and decoder weights of this step (tests, small tables)."""
        W = self.embedding.weight
        gE = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        for rows, g in self._emb_chunks():
            gE[rows] = g * self._coef
        gD = None
        if self.decoder is not None:
            gD = torch.zeros(self.decoder.weight.shape, dtype=torch.float32, device=W.device)
            for a, b, dW in self._dec_chunks():
                gD[a:b] = dW * self._coef
        return gE, gD

    @torch.no_grad()
    def step(self) -> None:
        """Update both tables (row chunk by row chunk), then drop the step's records."""
        self.peak_store_bytes = max(self.peak_store_bytes, self.store.nbytes())
        coef = self._coef
        self.emb_opt.begin_step()
        for rows, g in self._emb_chunks():
            self.emb_opt.update_rows(rows, g.mul_(coef) if coef != 1.0 else g)
        if self.dec_opt is not None:
            self.dec_opt.begin_step()
            for a, b, dW in self._dec_chunks():
                self.dec_opt.update_rows(slice(a, b), dW.mul_(coef) if coef != 1.0 else dW)
        self.store.clear()
        self._prep = None
        self._coef = 1.0
        self.embedding.weight.grad = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"emb": self.emb_opt.state_dict(), "dec": None if self.dec_opt is None else self.dec_opt.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.emb_opt.load_state_dict(sd["emb"])
        if self.dec_opt is not None and sd.get("dec") is not None:
            self.dec_opt.load_state_dict(sd["dec"])

    def state_bytes(self) -> int:
        return self.emb_opt.state_bytes() + (0 if self.dec_opt is None else self.dec_opt.state_bytes())


# ----------------------------------------------------------------------------- memory estimate
def memory_estimate(model_config, *, cells_per_gpu: int = 4, grad_accum: int = 4, gpus: int = 8,
                    seq: int = 8192, rlm: bool = True, positives_per_cell: int = 20_000, k: int = 5,
                    chunk: int | None = None, query_chunk: int | None = None, momentum: bool = False,
                    n_params: int | None = None) -> dict:
    """Bytes per GPU of the training state: dense fp32 AdamW versus the memory-lean mode.

    ``model_config``: an :class:`~epiflow.model.EpiAgentConfig` (with pretraining heads). Worst
    case for the lean buffers: every input sentence is ``seq`` tokens long and distinct tokens of a
    micro-batch are all distinct rows; with ``rlm`` the replaced copy of each cell doubles the
    input sentences. ``positives_per_cell`` accessible cCREs per cell (SR positives; CCA queries
    ``(1 + k)`` times as many). Activations are not included (they do not depend on the mode,
    except that dense mode also materialises ``[cells, N]`` signal logits).

    ``chunk`` / ``query_chunk`` default to the CUDA ones of :data:`CHUNKS`.

    Returns ``{"dense": {...}, "lean": {...}}`` (each with ``"total"``) and the inputs.
    """
    cfg = model_config
    chunk = int(chunk or CHUNKS["cuda"][0])
    query_chunk = int(query_chunk or CHUNKS["cuda"][1])
    D, V, N = int(cfg.dim), int(cfg.vocab_size), int(cfg.n_ccres)
    if n_params is None:
        from ..model import EpiAgent
        from ..model.checkpoint import meta_without_init

        with meta_without_init():
            n_params = sum(p.numel() for p in EpiAgent(cfg).parameters())
    P = int(n_params)
    n_tab = V * D + N * D
    n_small = P - n_tab  # encoder, rank embedding, heads, decoder bias
    dense = {"params_fp32": 4 * P, "grads_fp32": 4 * P, "adam_m_fp32": 4 * P, "adam_v_fp32": 4 * P}
    dense["total"] = sum(dense.values())

    seqs = cells_per_gpu * (2 if rlm else 1)
    rows_per_micro = min(V, seqs * (seq + 2))
    local_cells = cells_per_gpu * grad_accum
    step_cells = local_cells * gpus
    queries = local_cells * positives_per_cell * (1 + k)
    i64 = 8
    lean = {
        "params_fp32": 4 * P,
        "grads_dense_small": 4 * n_small,
        "adam_states_small": 8 * n_small,
        "rowwise_v_tables": 4 * (V + N),
        # coalesced sparse input-token gradient of each micro-batch (values fp32 + row index)
        "embedding_input_grads": grad_accum * rows_per_micro * (4 * D + i64),
        # CCA records: ids, cell row, label, sort order + sorted ids; the cell embeddings
        "cca_records": queries * (4 * i64 + 4) + local_cells * D * 4,
        # SR records after the all-gather: h, scale, pos_weight per cell; positives (row, col,
        # sort order, sorted copies) of every cell of the step + the local batch's CSR
        "sr_records": step_cells * (D + 2) * 4 + step_cells * positives_per_cell * 4 * i64
        + local_cells * positives_per_cell * 2 * i64,
    }
    if momentum:
        lean["bf16_momentum_tables"] = 2 * n_tab
    # transient work of the chunked passes (the largest of the three)
    # embedding: the chunk's gradient buffer, its touched rows gathered, their weights gathered (fp32)
    ws_emb = 3 * chunk * D * 4
    # decoder: logits and G of every cell of the step, dW; the rows are updated in place (a view)
    ws_dec = 2 * step_cells * chunk * 4 + chunk * D * 4
    ws_cca = query_chunk * (32 * D + 40 * int(cfg.cca_hidden))  # head forward + backward of a sub-batch
    lean["chunk_workspace"] = max(ws_emb, ws_dec, ws_cca)
    lean["total"] = sum(lean.values())
    return {"dense": dense, "lean": lean, "parameters": P, "table_parameters": n_tab, "other_parameters": n_small,
            "inputs": {"cells_per_gpu": cells_per_gpu, "grad_accum": grad_accum, "gpus": gpus, "seq": seq,
                       "rlm": rlm, "positives_per_cell": positives_per_cell, "k": k, "chunk": chunk,
                       "query_chunk": query_chunk, "momentum": momentum}}


def activation_estimate(model_config, tokens: int, *, checkpointing: bool = False, bf16: bool = True,
                        device: str = "cuda", dropout: float | None = None) -> dict:
    """Bytes of the encoder's activations kept for the backward pass of one micro-batch of ``tokens``
    tokens (packed: the sum of the sentence lengths with [CLS]/[SEP], both copies in RLM epochs).

    Counted per block and token, as autograd saves them (:class:`epiflow.model.epiagent.Block`):
    the inputs of the four linears (``Wqkv``, ``out_proj``, ``fc1``, ``fc2``) and of GELU, the fused
    ``qkv`` and the attention output that SDPA keeps, in the activation dtype (bf16 under autocast,
    else fp32); the inputs of both LayerNorms in fp32 with their mean and rstd; the two residual
    dropout masks (bool on CUDA, the activation dtype on CPU; none when the dropout is 0); the
    attention's log-sum-exp (fp32 per head). Under bf16 autocast each block also keeps bf16 copies of
    its four weight matrices. Attention is assumed fused (flash / memory-efficient SDPA, dropout
    inside the kernel): no ``L x L`` tensor. On CPU, attention dropout makes SDPA use its math
    kernel, which keeps ``L x L`` probabilities and masks that this estimate leaves out.

    With activation checkpointing each block keeps only its fp32 input until the backward pass,
    which recomputes one block at a time: the peak holds every block's input plus one block's
    saved tensors. Not included: embeddings, heads, gradients in flight and allocator slack.

    Returns ``{"per_token_per_block", "weight_copies_per_block", "kept_after_forward",
    "peak_in_backward", ...}`` in bytes (the first two exact, checked by counting autograd's saved
    tensors in ``tests/test_train_lean.py``).
    """
    cfg = model_config
    D, F_, H, n_layers = int(cfg.dim), int(cfg.ffn), int(cfg.num_heads), int(cfg.num_layers)
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    act = 2 if bf16 else 4
    p = float(cfg.dropout if dropout is None else dropout)
    mask = 0 if p == 0.0 else (1 if str(device).startswith("cuda") else act)
    per_token = (act * (7 * D + 2 * F_)  # Wqkv in, qkv, attention out, out_proj in, fc1 in, GELU in, fc2 in
                 + 2 * mask * D  # two residual dropout masks
                 + 2 * (4 * D + 8)  # LayerNorm inputs (fp32) + mean and rstd
                 + 4 * H)  # attention log-sum-exp
    weights = act * (4 * D * D + 2 * D * F_) if bf16 else 0
    block = per_token * int(tokens) + weights
    if checkpointing:
        kept = n_layers * 4 * D * int(tokens)
        peak = kept + block
    else:
        kept = peak = n_layers * block
    return {"per_token_per_block": per_token, "weight_copies_per_block": weights, "kept_after_forward": kept,
            "peak_in_backward": peak, "inputs": {"tokens": int(tokens), "checkpointing": checkpointing, "bf16": bf16,
                                                 "device": str(device), "dropout": p, "blocks": n_layers}}
