"""EpiAgent in plain PyTorch (SPEC §3).

Input = cCRE embedding + rank embedding (position 0..L-1, [CLS] has rank 0), optionally plus a
conditional token at position 0; a post-norm BERT-style encoder (fused QKV, exact GELU, LayerNorm
eps 1e-12, no final norm); heads on the cell embedding (= output at [CLS]) and on token outputs.

Module attribute names are the authors' state-dict key names (``cCRE_embedding``,
``EpiAgent_transformer.layers.N.mixer.Wqkv``, ``fc1_for_CCA``, ``criterion_SR.pos_weight``, ...)
and modules are registered in the authors' key order, so ``state_dict()`` *is* the authors'
checkpoint format (see :mod:`epiflow.model.checkpoint`). Extensions that the authors' files do not
have (linear classifier, stimulation tokens, perturbation GNN) are registered after those keys.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..errors import ConfigError, VocabularyMismatchError
from .attention import (
    Packing,
    attention_flash,
    attention_packed,
    attention_padded,
    packed_kernel_for,
    resolve_backend,
)
from .config import NUM_SPECIAL, EpiAgentConfig
from .gnn import PerturbationGNN


# --------------------------------------------------------------------------- outputs
@dataclass
class EpiAgentOutput:
    hidden: torch.Tensor            # [B, L, D] encoder output (pad positions unspecified)
    cell_embedding: torch.Tensor    # [B, D] = hidden[:, 0]
    attention_mask: torch.Tensor    # [B, L] bool, True = real token


@dataclass
class PackedOutput:
    hidden: torch.Tensor            # [T, D] encoder output of the packed tokens
    cell_embedding: torch.Tensor    # [B, D] output at each sequence's first token ([CLS])
    packing: Packing


@dataclass
class _Ctx:
    """What the attention layers need to know about the batch layout."""

    backend: str
    mask: torch.Tensor | None = None      # padded layout: [B, L] key padding mask
    packing: Packing | None = None        # packed layout
    kernel: str | None = None             # packed layout: attention.packed_kernel_for, decided per batch


# --------------------------------------------------------------------------- encoder
class SelfAttention(nn.Module):
    """Fused-QKV multi-head self-attention; ``Wqkv`` rows are [Q; K; V], head h = rows h*d..h*d+d-1."""

    def __init__(self, cfg: EpiAgentConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.Wqkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        H, d = self.num_heads, self.head_dim
        p = self.dropout if self.training else 0.0
        qkv = self.Wqkv(x)
        if ctx.packing is None:  # padded [B, L, D]
            B, L, D = x.shape
            q, k, v = qkv.view(B, L, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, d]
            out = attention_padded(q, k, v, ctx.mask, p).transpose(1, 2).reshape(B, L, D)
        else:  # packed [T, D]
            T, D = x.shape
            qkv = qkv.view(T, 3, H, d)
            if ctx.backend == "flash":
                out = attention_flash(qkv, ctx.packing, p)
            else:
                q, k, v = qkv.unbind(1)
                out = attention_packed(q, k, v, ctx.packing, p, kernel=ctx.kernel)
            out = out.reshape(T, D)
        return self.out_proj(out)


class Mlp(nn.Module):
    def __init__(self, cfg: EpiAgentConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Post-norm block: ``h = LN1(h + Attn(h)); h = LN2(h + MLP(h))``."""

    def __init__(self, cfg: EpiAgentConfig):
        super().__init__()
        self.mixer = SelfAttention(cfg)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg)
        self.dropout2 = nn.Dropout(cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)

    def forward(self, x, ctx: _Ctx):
        x = self.norm1(x + self.dropout1(self.mixer(x, ctx)))
        return self.norm2(x + self.dropout2(self.mlp(x)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear layer's output has for input ``x``: autocast's when it is on for the device."""
    try:
        on = torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type without autocast (meta)
        on = False
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


class Encoder(nn.Module):
    def __init__(self, cfg: EpiAgentConfig):
        super().__init__()
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.gradient_checkpointing = False

    def forward(self, x, ctx: _Ctx, return_layers: bool = False):
        packing = ctx.packing
        if packing is not None and ctx.backend == "packed" and ctx.kernel is None:
            # the attention kernel of this batch, decided here, outside the (possibly compiled) blocks: q/k/v
            # come out of Wqkv, in autocast's dtype when it is on
            ctx = dataclasses.replace(ctx, kernel=packed_kernel_for(x.device, _compute_dtype(x)))
            if ctx.kernel == "flash-varlen":
                packing.cu_seqlens_int32()  # converted once, here
        outs = []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = _checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
            if return_layers:
                outs.append(x)
        return (x, outs) if return_layers else x


# --------------------------------------------------------------------------- heads
class _Criterion(nn.Module):
    """Holds the ``pos_weight`` buffer of the authors' ``criterion_*`` BCE modules (checkpoint format)."""

    def __init__(self, pos_weight):
        super().__init__()
        self.register_buffer("pos_weight", torch.as_tensor(pos_weight))


class Classifier(nn.Module):
    """``mlp``: ``fc3(LN2(GELU(fc2(dropout(LN1(fc1(x)))))))``, the authors' 512-256-128-C head (no
    activation between fc1 and LN1; focal loss). ``linear``: one Linear layer (the paper; cross-entropy)."""

    def __init__(self, cfg: EpiAgentConfig):
        super().__init__()
        self.kind = cfg.classifier
        if self.kind == "linear":
            self.fc = nn.Linear(cfg.dim, cfg.num_classes)
        else:
            h1, h2 = cfg.classifier_hidden
            self.fc1 = nn.Linear(cfg.dim, h1)
            self.layer_norm1 = nn.LayerNorm(h1, eps=cfg.head_ln_eps)
            self.dropout = nn.Dropout(cfg.classifier_dropout)
            self.fc2 = nn.Linear(h1, h2)
            self.layer_norm2 = nn.LayerNorm(h2, eps=cfg.head_ln_eps)
            self.fc3 = nn.Linear(h2, cfg.num_classes)

    def forward(self, x):
        if self.kind == "linear":
            return self.fc(x)
        x = self.dropout(self.layer_norm1(self.fc1(x)))
        return self.fc3(self.layer_norm2(F.gelu(self.fc2(x))))


# --------------------------------------------------------------------------- model
class EpiAgent(nn.Module):
    """The EpiAgent model. Build with :meth:`from_config`; load published weights with
    :func:`epiflow.model.load_epiagent_checkpoint`.

    ``model(input_ids)`` -> :class:`EpiAgentOutput`; heads: :meth:`signal_logits`, :meth:`cca_logits`,
    :meth:`rlm_logits`, :meth:`classify`. ``model.encode_packed(tokens, cu_seqlens)`` runs the
    encoder on a packed batch (training without pad waste).
    """

    def __init__(self, cfg: EpiAgentConfig, backend: str = "sdpa"):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.backend = _backend_setting(backend)
        # the cCRE vocabulary trained on (corpus vocab_id; None: unknown), kept in the side file
        self.vocab_id: str | None = None
        D = cfg.dim
        # --- authors' keys, in their order
        self.cCRE_embedding = nn.Embedding(cfg.vocab_size, D)
        self.rank_embedding = nn.Embedding(cfg.max_rank, D)
        self.EpiAgent_transformer = Encoder(cfg)
        if cfg.pretrain_heads:
            self.fc1_for_RLM = nn.Linear(D, cfg.rlm_hidden)
            self.layer_norm_for_RLM = nn.LayerNorm(cfg.rlm_hidden, eps=cfg.head_ln_eps)
            self.fc2_for_RLM = nn.Linear(cfg.rlm_hidden, 1)
            self.fc1_for_CCA = nn.Linear(2 * D, cfg.cca_hidden)
            self.layer_norm_for_CCA = nn.LayerNorm(cfg.cca_hidden, eps=cfg.head_ln_eps)
            self.fc2_for_CCA = nn.Linear(cfg.cca_hidden, 1)
            self.signal_decoder = nn.Linear(D, cfg.n_ccres)
            if cfg.criterion_buffers:
                srw = cfg.sr_pos_weight
                self.criterion_SR = _Criterion(int(srw) if float(srw).is_integer() else float(srw))
                self.criterion_RLM = _Criterion(torch.tensor(float(cfg.rlm_pos_weight)))
                self.criterion_CCA = _Criterion(torch.tensor(float(cfg.cca_pos_weight)))
        if cfg.classifier:
            self.classifier = Classifier(cfg)
        if cfg.num_batches:
            self.batch_embedding = nn.Embedding(cfg.num_batches, D)
        # --- extensions (not in the authors' files)
        if cfg.num_conditions:
            self.condition_embedding = nn.Embedding(cfg.num_conditions, D)
        if cfg.num_genes:
            self.perturbation_gnn = PerturbationGNN(cfg.num_genes, D, cfg.gnn_edges, cfg.head_ln_eps)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: EpiAgentConfig, backend: str = "sdpa") -> "EpiAgent":
        """A freshly initialised model (``cfg.init``: 'authors' = PyTorch defaults, 'bert' = N(0, 0.02))."""
        model = cls(cfg, backend=backend)
        if cfg.init == "bert":
            model.apply(_bert_init)
        return model

    @property
    def n_ccres(self) -> int:
        return self.config.n_ccres

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def encoder(self) -> Encoder:
        return self.EpiAgent_transformer

    def set_backend(self, backend: str) -> "EpiAgent":
        dev = next(self.parameters()).device
        self.backend = _backend_setting(backend, None if dev.type == "meta" else dev)
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> "EpiAgent":
        self.EpiAgent_transformer.gradient_checkpointing = bool(enabled)
        return self

    def compile_blocks(self, **kwargs: Any) -> "EpiAgent":
        """``torch.compile`` each encoder block in place (``nn.Module.compile``: the parameters, their
        names and the checkpoint format stay as they are), ``dynamic=True`` unless given: the token
        count changes every batch. Only the blocks: the padded/packed conversions around them depend on
        the data and would recompile at every batch. The blocks hold no data-dependent Python on CUDA's
        varlen flash path and on the padded sdpa path (the kernel is decided per batch before them); on
        the per-sequence packed path (CPU) their loop over the sequence lengths recompiles each batch.
        ``kwargs`` go to ``torch.compile`` (the tests pass ``fullgraph=True`` and a backend that records
        the graphs)."""
        kwargs.setdefault("dynamic", True)
        for layer in self.EpiAgent_transformer.layers:
            layer.compile(**kwargs)
        return self

    def pos_weight(self, which: str) -> float | torch.Tensor:
        """The BCE positive weight of ``'SR'``, ``'RLM'`` or ``'CCA'`` (checkpoint buffer, else config)."""
        mod = getattr(self, f"criterion_{which}", None)
        if mod is not None:
            return mod.pos_weight
        return {"SR": self.config.sr_pos_weight, "RLM": self.config.rlm_pos_weight,
                "CCA": self.config.cca_pos_weight}[which]

    def parameter_counts(self) -> dict[str, int]:
        groups: dict[str, int] = {}
        for name, p in self.named_parameters():
            g = parameter_group(name)
            groups[g] = groups.get(g, 0) + p.numel()
        groups["total"] = sum(p.numel() for p in self.parameters())
        return groups

    # ------------------------------------------------------------------ conditional token
    def conditional_embedding(self, batch_ids: torch.Tensor | None = None, condition_ids: torch.Tensor | None = None,
                              perturbation: torch.Tensor | None = None, cond_embedding: torch.Tensor | None = None) -> torch.Tensor | None:
        """Sum of the conditional tokens for position 0, ``[B, D]`` (None if there is none).

        ``batch_ids`` / ``condition_ids``: LongTensor [B], -1 = no token for that cell;
        ``perturbation``: gene indices for the GNN ([B] or [B, k], -1 = none);
        ``cond_embedding``: any precomputed ``[B, D]`` embedding.
        """
        parts = []
        for ids, attr, opt in ((batch_ids, "batch_embedding", "num_batches"),
                               (condition_ids, "condition_embedding", "num_conditions")):
            if ids is None:
                continue
            table = getattr(self, attr, None)
            if table is None:
                raise ConfigError(f"this model has no {attr} ({opt} = 0)", field=opt,
                                  fix="load a checkpoint/config with conditional tokens, or pass None")
            ids = torch.as_tensor(ids, device=table.weight.device).long()
            if ids.numel() and int(ids.max()) >= table.num_embeddings:
                raise ConfigError(f"{attr} has {table.num_embeddings} rows but id {int(ids.max())} was given",
                                  field=opt)
            if bool((ids < 0).any()):
                parts.append(table(ids.clamp(min=0)) * (ids >= 0)[:, None].to(table.weight.dtype))
            else:
                parts.append(table(ids))
        if perturbation is not None:
            gnn = getattr(self, "perturbation_gnn", None)
            if gnn is None:
                raise ConfigError("this model has no perturbation GNN (num_genes = 0)", field="num_genes")
            parts.append(gnn(perturbation))
        if cond_embedding is not None:
            parts.append(cond_embedding)
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    # ------------------------------------------------------------------ embeddings
    def _check_ids(self, ids: torch.Tensor, width: int) -> None:
        if width > self.config.max_rank:
            raise ConfigError(
                f"input length {width} exceeds the {self.config.max_rank} rank embeddings of the model",
                field="input_ids", fix=f"keep at most {self.config.max_rank - 2} tokens per cell "
                                       "(epiflow.tokenize.truncate_sentences)")
        if ids.numel():
            hi, lo = int(ids.max()), int(ids.min())
            if hi >= self.config.vocab_size or lo < 0:
                raise VocabularyMismatchError(
                    f"token id {hi if hi >= self.config.vocab_size else lo} is outside the model vocabulary "
                    f"(0..{self.config.vocab_size - 1}, {self.config.n_ccres} cCREs + 4 special tokens)",
                    field="input_ids", fix="tokenize with the checkpoint's cCRE vocabulary")

    def _add_cond(self, tok_first: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cond = cond.to(tok_first.dtype)
        return cond if self.config.cond_mode == "replace" else tok_first + cond

    def embed_padded(self, input_ids: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        B, L = input_ids.shape
        tok = self.cCRE_embedding(input_ids)
        if cond is not None:
            tok = torch.cat([self._add_cond(tok[:, 0], cond)[:, None], tok[:, 1:]], 1)
        return tok + self.rank_embedding(torch.arange(L, device=input_ids.device))

    def embed_packed(self, tokens: torch.Tensor, positions: torch.Tensor, packing: Packing,
                     cond: torch.Tensor | None = None) -> torch.Tensor:
        tok = self.cCRE_embedding(tokens)
        if cond is not None:
            starts = packing.starts
            tok = tok.index_copy(0, starts, self._add_cond(tok[starts], cond).to(tok.dtype))
        return tok + self.rank_embedding(positions)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, batch_ids: torch.Tensor | None = None, *, cond_embedding: torch.Tensor | None = None,
                condition_ids: torch.Tensor | None = None, perturbation: torch.Tensor | None = None,
                backend: str | None = None) -> EpiAgentOutput:
        """Encode a padded batch ``[B, L]`` (PAD = 0, ``[CLS] sentence [SEP]`` right-padded)."""
        if input_ids.ndim != 2:
            raise ConfigError(f"input_ids must be [B, L], got shape {list(input_ids.shape)}", field="input_ids")
        input_ids = input_ids.long()
        backend = resolve_backend(backend or self.backend, input_ids.device, training=self.training)
        self._check_ids(input_ids, input_ids.shape[1])
        cond = self.conditional_embedding(batch_ids, condition_ids, perturbation, cond_embedding)
        mask = input_ids != 0
        if backend == "sdpa":
            x = self.embed_padded(input_ids, cond)
            h = self.EpiAgent_transformer(x, _Ctx("sdpa", mask=mask))
            return EpiAgentOutput(h, h[:, 0], mask)
        B, L = input_ids.shape
        packing = Packing.from_lengths(mask.sum(1), device=input_ids.device)
        tokens = input_ids[mask]
        positions = torch.arange(L, device=input_ids.device).expand(B, L)[mask]
        x = self.embed_packed(tokens, positions, packing, cond)
        hp = self.EpiAgent_transformer(x, _Ctx(backend, packing=packing))
        hidden = hp.new_zeros(B, L, hp.shape[-1]).index_put((mask,), hp)
        return EpiAgentOutput(hidden, hp[packing.starts], mask)

    def encode(self, input_ids: torch.Tensor, batch_ids: torch.Tensor | None = None, cond_embedding: torch.Tensor | None = None,
               **kw: Any) -> EpiAgentOutput:
        return self.forward(input_ids, batch_ids, cond_embedding=cond_embedding, **kw)

    def encode_packed(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, batch_ids: torch.Tensor | None = None, *,
                      cond_embedding: torch.Tensor | None = None, condition_ids: torch.Tensor | None = None, perturbation: torch.Tensor | None = None,
                      backend: str | None = None) -> PackedOutput:
        """Encode a packed batch: ``tokens`` [T] holds ``[CLS] sentence [SEP]`` of every cell back to back,
        ``cu_seqlens`` [B+1] the boundaries. Uses the ``packed`` (or ``flash``) attention."""
        backend = resolve_backend(backend or self.backend, tokens.device, training=self.training)
        if backend == "sdpa":
            backend = "packed"
        tokens = tokens.long()
        packing = Packing.from_cu_seqlens(cu_seqlens.to(tokens.device))
        if packing.total != tokens.numel():
            raise ConfigError(f"cu_seqlens ends at {packing.total} but there are {tokens.numel()} tokens",
                              field="cu_seqlens")
        self._check_ids(tokens, packing.max_seqlen)
        cond = self.conditional_embedding(batch_ids, condition_ids, perturbation, cond_embedding)
        x = self.embed_packed(tokens, packing.positions(), packing, cond)
        hp = self.EpiAgent_transformer(x, _Ctx(backend, packing=packing))
        return PackedOutput(hp, hp[packing.starts], packing)

    def layer_outputs(self, input_ids: torch.Tensor, batch_ids: torch.Tensor | None = None, **kw: Any) -> list[torch.Tensor]:
        """``[embeddings, layer0_output, ...]`` of a padded batch with the sdpa backend (for checks)."""
        input_ids = input_ids.long()
        self._check_ids(input_ids, input_ids.shape[1])
        cond = self.conditional_embedding(batch_ids, **kw)
        x = self.embed_padded(input_ids, cond)
        _, outs = self.EpiAgent_transformer(x, _Ctx("sdpa", mask=input_ids != 0), return_layers=True)
        return [x, *outs]

    # ------------------------------------------------------------------ heads
    def _need(self, attr: str, what: str):
        mod = getattr(self, attr, None)
        if mod is None:
            raise ConfigError(f"this {self.kind} model has no {what}",
                              fix="load a checkpoint that has it (pretrained: signal decoder / CCA / RLM; "
                                  "supervised: classifier)")
        return mod

    def signal_logits(self, cell_embedding: torch.Tensor) -> torch.Tensor:
        """Signal decoder: ``[B, D] -> [B, n_cCRE]`` logits (column j = cCRE j)."""
        return self._need("signal_decoder", "signal decoder")(cell_embedding)

    def cca_logits(self, cell_rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Cell-cCRE alignment: one cell-embedding row ``[Q, D]`` and one token id ``[Q]`` per query -> ``[Q]``.

        Uses the INPUT cCRE embedding of the queried token. ``expand_rows(cell_embedding, offsets)``
        builds ``cell_rows`` from per-cell query counts.
        """
        fc1 = self._need("fc1_for_CCA", "CCA head")
        z = torch.cat([cell_rows, self.cCRE_embedding(token_ids.long())], -1)
        return self.fc2_for_CCA(self.layer_norm_for_CCA(F.gelu(fc1(z)))).squeeze(-1)

    def rlm_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """Replaced-LM head on contextual token outputs ``[T, D] -> [T]``."""
        fc1 = self._need("fc1_for_RLM", "RLM head")
        return self.fc2_for_RLM(self.layer_norm_for_RLM(F.gelu(fc1(hidden_rows)))).squeeze(-1)

    def classify(self, cell_embedding: torch.Tensor) -> torch.Tensor:
        """Classifier logits ``[B, C]`` (supervised checkpoints)."""
        return self._need("classifier", "classifier")(cell_embedding)

    # ------------------------------------------------------------------ checkpoint
    def save_epiagent_checkpoint(self, path: str | os.PathLike, *, write_config: bool = False) -> Path:
        """Write the state dict in the authors' format (plain ``torch.save``; atomic)."""
        from .checkpoint import save_epiagent_checkpoint

        return save_epiagent_checkpoint(self, path, write_config=write_config)


# --------------------------------------------------------------------------- helpers
_GROUPS = {"cCRE_embedding": "embeddings", "rank_embedding": "embeddings", "EpiAgent_transformer": "encoder",
           "signal_decoder": "signal_decoder", "classifier": "classifier"}


def parameter_group(name: str) -> str:
    """The group a parameter or state-dict entry is counted in: ``embeddings``, ``encoder``,
    ``signal_decoder``, ``classifier``, ``heads`` (RLM / CCA), ``buffers`` (loss weights, the gene
    graph) or ``conditional`` (batch / [PER] tokens, gene GNN)."""
    top = name.split(".")[0]
    group = _GROUPS.get(top)
    if group is not None:
        return group
    if top.startswith("criterion_") or name.endswith(("edge_index", "edge_weight")):
        return "buffers"
    return "heads" if top.endswith(("_RLM", "_CCA")) else "conditional"


def _backend_setting(backend: str | None, device=None) -> str:
    """The model's attention setting: a validated backend name; ``"auto"`` is kept as is and resolved
    at each call from the device and the train / eval mode (:func:`resolve_backend`)."""
    name = resolve_backend(backend, device)  # validates (raises on unknown names, flash without CUDA)
    return "auto" if str(backend).lower() == "auto" else name


def expand_rows(cell_embedding: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Repeat row i of ``cell_embedding`` ``offsets[i+1] - offsets[i]`` times (CCA query rows)."""
    offsets = torch.as_tensor(offsets, device=cell_embedding.device).long()
    return cell_embedding.repeat_interleave(offsets[1:] - offsets[:-1], dim=0)


def token_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """Positions holding cCRE tokens (id > 3): the RLM positions, row-major."""
    return input_ids >= NUM_SPECIAL


def from_config(cfg: EpiAgentConfig, backend: str = "sdpa") -> EpiAgent:
    return EpiAgent.from_config(cfg, backend=backend)


def _bert_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def approx_flops_per_token(cfg: EpiAgentConfig, seq_len: float) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of the encoder and signal-decoder
    matmuls plus attention scores, for MFU estimates."""
    D, F_, Lyr = cfg.dim, cfg.ffn, cfg.num_layers
    per_layer = 2 * (3 * D * D + D * D + 2 * D * F_) + 2 * 2 * seq_len * D
    return 3.0 * Lyr * per_layer + (3.0 * 2 * D * cfg.n_ccres / max(seq_len, 1) if cfg.pretrain_heads else 0.0)

