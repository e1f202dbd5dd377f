"""Bidirectional self-attention backends, selectable at run time.

* ``"sdpa"``   - padded ``[B, H, L, d]`` tensors, :func:`torch.nn.functional.scaled_dot_product_attention`
  with a boolean key-padding mask (True = keep). Pad queries are computed too (they attend to the
  real keys), exactly like the authors' non-flash path.
* ``"packed"`` - variable-length ("varlen") attention on packed ``[T, H, d]`` tensors, no pad waste.
  On CUDA in fp16/bf16 (compute capability >= 8.0) one call of PyTorch's own FlashAttention-2 varlen
  kernel covers the whole batch, with the attention dropout of training
  (``torch.ops.aten._flash_attention_forward``, the kernel behind ``torch.nn.attention.varlen`` and
  behind SDPA on nested tensors; autograd runs its backward); elsewhere (CPU, fp32, older GPUs, or
  ``EPIFLOW_PACKED_PER_SEQUENCE=1``) it runs one SDPA call per sequence of the batch (block-diagonal
  attention without materialising the block-diagonal mask; a Python loop over the <= few dozen
  sequences of a batch, not over cells; also with ``EPIFLOW_SDPA_CUDNN=1``, so that SDPA may pick
  cuDNN). :func:`packed_kernel` says which.
* ``"flash"``  - ``flash_attn.flash_attn_varlen_qkvpacked_func`` (the kernel the authors use); CUDA,
  fp16/bf16 only, needs the optional ``flash-attn`` package.

All backends use the softmax scale ``1 / sqrt(head_dim)``.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError

BACKENDS = ("sdpa", "packed", "flash")
PACKED_BACKENDS = ("packed", "flash")


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_attn_available() -> bool:
    """True when the optional flash-attn package is importable and a CUDA device is present."""
    return flash_attn_installed() and torch.cuda.is_available()


def resolve_backend(name: str | None, device: torch.device | str | None = None, *,
                    training: bool = False) -> str:
    """Validate a backend name; ``"auto"`` picks flash > packed on CUDA; on CPU packed for training
    and sdpa for inference.

    On CPU the packed path (one SDPA call per sequence, no pad tokens) trains about twice as fast as
    the padded batch (random subsamples of sentences have very different lengths, and dropout and the
    backward pass work on every padded position), while for inference, whose batches are sorted by
    length, the single padded SDPA call is slightly faster (benchmarks/README.md)."""
    name = "sdpa" if name is None else str(name).lower()
    dev = torch.device(device) if device is not None else None
    if name == "auto":
        if dev is not None and dev.type == "cuda":
            return "flash" if flash_attn_available() else "packed"
        return "packed" if training else "sdpa"
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}", field="backend",
                          fix=f"use one of {', '.join(BACKENDS)} or 'auto'")
    if name == "flash":
        if not flash_attn_installed():
            raise ConfigError("attention backend 'flash' needs the optional package flash-attn, which is "
                              "not installed", field="backend",
                              fix="pip install flash-attn (CUDA only), or use backend 'packed' or 'sdpa'")
        if dev is not None and dev.type != "cuda":
            raise ConfigError(f"attention backend 'flash' runs on CUDA only (device is {dev})",
                              field="backend", fix="use backend 'packed' or 'sdpa' on CPU")
    return name


@dataclass
class Packing:
    """Sequence boundaries of a packed batch: sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``."""

    cu_seqlens: torch.Tensor      # int64 [B + 1], on the model's device
    seqlens: list[int]            # host copy of the lengths
    max_seqlen: int
    _cu32: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_lengths(cls, lengths, device=None) -> "Packing":
        if isinstance(lengths, torch.Tensor):
            seqlens = [int(x) for x in lengths.tolist()]
        else:
            seqlens = [int(x) for x in lengths]
        cu = torch.zeros(len(seqlens) + 1, dtype=torch.int64)
        if seqlens:
            cu[1:] = torch.cumsum(torch.as_tensor(seqlens, dtype=torch.int64), 0)
        return cls(cu.to(device) if device is not None else cu, seqlens, max(seqlens, default=0))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor) -> "Packing":
        host = cu_seqlens.detach().to("cpu", torch.int64)
        seqlens = (host[1:] - host[:-1]).tolist()
        return cls(cu_seqlens.to(torch.int64), seqlens, max(seqlens, default=0))

    @property
    def total(self) -> int:
        return int(sum(self.seqlens))

    @property
    def starts(self) -> torch.Tensor:
        return self.cu_seqlens[:-1]

    def positions(self) -> torch.Tensor:
        """Position of every packed row inside its own sequence (0 = [CLS])."""
        dev = self.cu_seqlens.device
        lens = torch.as_tensor(self.seqlens, dtype=torch.int64, device=dev)
        return torch.arange(self.total, device=dev) - torch.repeat_interleave(self.cu_seqlens[:-1], lens)

    def cu_seqlens_int32(self) -> torch.Tensor:
        """``cu_seqlens`` as int32 (the flash kernels' type), converted once per batch, not once per layer."""
        if self._cu32 is None:
            self._cu32 = self.cu_seqlens.to(torch.int32)
        return self._cu32


def cudnn_sdpa_allowed() -> bool:
    """Whether SDPA may pick PyTorch's cuDNN attention kernel on CUDA (``EPIFLOW_SDPA_CUDNN=1``).

    Off by default. cuDNN attention builds (and caches) an execution graph per input shape, which
    takes a long time (hundreds of ms have been reported), and the shapes here change at every call:
    each cell has its own sentence length, and each padded batch its own maximum. On an H200
    (benchmarks/README.md, GPU results) a train step of the paper model on 4 cells of realistic
    lengths took 0.50 s in the timed loop, where it had chosen cuDNN for every attention call, but
    72 ms of GPU time when the same shapes were repeated. Without cuDNN, SDPA uses PyTorch's own
    flash kernel (no mask) or the memory-efficient one (a key-padding mask, or fp32), which build
    nothing per shape. Set the variable to compare (``bench_model.py --variants packed,packed+cudnn``).
    """
    import os

    return os.environ.get("EPIFLOW_SDPA_CUDNN", "0").strip().lower() in ("1", "true", "yes")


def _sdpa(q, k, v, attn_mask=None, dropout_p: float = 0.0):
    """``F.scaled_dot_product_attention`` on 4-D ``[B, H, L, d]``, without cuDNN on CUDA unless allowed."""
    if q.is_cuda and not cudnn_sdpa_allowed():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def attention_padded(q, k, v, key_padding_mask, dropout_p: float = 0.0):
    """q, k, v ``[B, H, L, d]``; ``key_padding_mask`` bool ``[B, L]`` (True = real token)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return _sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def per_sequence_forced() -> bool:
    """``EPIFLOW_PACKED_PER_SEQUENCE=1``: the packed backend runs one SDPA call per sequence even where
    the varlen flash kernel is available (to compare the two: ``bench_model.py --variants
    packed,packed+perseq``)."""
    import os

    return os.environ.get("EPIFLOW_PACKED_PER_SEQUENCE", "0").strip().lower() in ("1", "true", "yes")


def _flash_varlen_op():
    """PyTorch's varlen FlashAttention-2 forward (``aten::_flash_attention_forward``), or None."""
    return getattr(torch.ops.aten, "_flash_attention_forward", None)


@functools.lru_cache(maxsize=None)
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # PyTorch's flash kernels: sm80+


def _flash_varlen_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_varlen_op() is not None
            and _flash_capable(device.index if device.index is not None else torch.cuda.current_device()))


def packed_kernel_for(device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel :func:`attention_packed` runs for q/k/v of ``dtype`` on ``device``: ``"flash-varlen"``
    (one call per batch) or ``"per-sequence"`` (one SDPA call per sequence: off CUDA / fp16-bf16, with
    ``EPIFLOW_PACKED_PER_SEQUENCE=1``, and with ``EPIFLOW_SDPA_CUDNN=1``, whose cuDNN attention SDPA
    can pick only when it is called). The encoder decides once per batch, before its blocks, so that
    compiled blocks (``EpiAgent.compile_blocks``) see a plain string."""
    if _flash_varlen_ok(torch.device(device), dtype) and not per_sequence_forced() and not cudnn_sdpa_allowed():
        return "flash-varlen"
    return "per-sequence"


def packed_kernel(q: torch.Tensor) -> str:
    """:func:`packed_kernel_for` of a query tensor."""
    return packed_kernel_for(q.device, q.dtype)


def attention_packed(q, k, v, packing: Packing, dropout_p: float = 0.0, kernel: str | None = None):
    """Block-diagonal attention over packed ``[T, H, d]`` tensors; returns ``[T, H, d]``. ``kernel``: as
    :func:`packed_kernel` decides (None: decide here)."""
    if (kernel or packed_kernel(q)) == "flash-varlen":
        # one kernel call for every sequence of the batch, dropout included (the public
        # torch.nn.attention.varlen.varlen_attn has no dropout argument); scale 1 / sqrt(d)
        cu = packing.cu_seqlens_int32()
        return _flash_varlen_op()(q, k, v, cu, cu, packing.max_seqlen, packing.max_seqlen,
                                  float(dropout_p), False, False)[0]
    # one SDPA call per sequence: [1, H, L_i, d] blocks, no padding, no mask. The leading batch
    # dimension matters: SDPA's fused kernels (flash, memory-efficient) take 4-D inputs only, and a
    # 3-D call falls back to the math kernel, which materialises the L_i x L_i attention matrix and
    # its dropout mask (on an H200 that filled 137 GB for 4 cells of the paper model).
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, T, d]
    outs = []
    for qi, ki, vi in zip(qh.split(packing.seqlens, 2), kh.split(packing.seqlens, 2),
                          vh.split(packing.seqlens, 2)):
        outs.append(_sdpa(qi, ki, vi, dropout_p=dropout_p))
    return torch.cat(outs, 2)[0].transpose(0, 1)


def attention_flash(qkv, packing: Packing, dropout_p: float = 0.0):
    """flash-attn varlen on packed ``[T, 3, H, d]`` (fp16/bf16, CUDA); returns ``[T, H, d]``."""
    try:
        from flash_attn import flash_attn_varlen_qkvpacked_func
    except ImportError as exc:  # pragma: no cover - depends on the optional package
        raise ConfigError(f"attention backend 'flash' needs flash-attn ({exc})", field="backend",
                          fix="pip install flash-attn, or use backend 'packed'") from None
    if not qkv.is_cuda:
        raise ConfigError("attention backend 'flash' runs on CUDA only", field="backend",
                          fix="use backend 'packed' or 'sdpa' on CPU")
    if qkv.dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError(f"flash-attn needs fp16/bf16 activations, got {qkv.dtype}", field="backend",
                          fix="run under torch.autocast('cuda', dtype=torch.bfloat16) (embed does this)")
    return flash_attn_varlen_qkvpacked_func(qkv, packing.cu_seqlens_int32(), packing.max_seqlen,
                                            dropout_p=dropout_p)
