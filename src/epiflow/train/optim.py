"""Optimisation: AdamW, learning-rate schedules, gradient clipping helpers.

Schedules (``lr`` is the configured peak/base learning rate):

* ``"cosine"`` (default): linear warm-up from 0 to ``lr`` over ``warmup`` steps, then cosine decay to
  ``min_lr_ratio * lr`` at the last step.
* ``"linear"``: the same warm-up, then linear decay to ``min_lr_ratio * lr``.
* ``"constant"``: warm-up, then constant ``lr``.
* ``"inverse_sqrt"``: the authors' fine-tuning schedule, a ``LambdaLR`` with factor
  ``min((s + 1) ** -0.5, (s + 1) * warmup ** -1.5)``. It rises linearly and peaks at step
  ``s = warmup - 1`` with factor ``1 / sqrt(warmup)``, i.e. **the peak learning rate is
  lr / sqrt(warmup), not lr** (with lr = 1e-4 and warmup = 10,000 the peak is 1e-6); afterwards it
  decays as ``lr / sqrt(s + 1)``. Scale ``lr`` by ``sqrt(warmup)`` to get a peak of ``lr``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import ConfigError

from .config import SCHEDULES  # noqa: E402,F401 (declared with the settings)


def lr_factor(step: int, schedule: str, warmup: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at 0-based ``step``."""
    s = int(step)
    warmup = max(0, int(warmup))
    if schedule == "inverse_sqrt":
        w = max(1, warmup)
        return min((s + 1) ** -0.5, (s + 1) * w ** -1.5)
    if warmup and s < warmup:
        return (s + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, int(total_steps) - warmup)
    prog = min(1.0, max(0.0, (s - warmup) / span))
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - prog)
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * prog))
    raise ConfigError(f"unknown learning-rate schedule {schedule!r}", field="schedule",
                      fix=f"use one of {', '.join(SCHEDULES)}")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total_steps: int,
                   min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown learning-rate schedule {schedule!r}", field="schedule",
                          fix=f"use one of {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, schedule, warmup, total_steps, min_lr_ratio))


def inverse_sqrt_lambda(warmup: int) -> Callable[[int], float]:
    """The authors' LambdaLR factor function (peak ``1 / sqrt(warmup)`` at step ``warmup - 1``)."""
    return lambda s: lr_factor(s, "inverse_sqrt", warmup, 0)


def param_groups(named_params, weight_decay: float):
    """AdamW groups: no weight decay on biases, LayerNorm parameters and 1-d tensors."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_adamw(named_params, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
               fused: bool | None = None):
    groups = param_groups(named_params, weight_decay)
    kw = {}
    if fused:
        kw["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)


# ----------------------------------------------------------------------------- row-wise AdamW
class RowwiseAdamW:
    """AdamW with a **row-wise** second moment for the huge tables (cCRE embedding, signal decoder).

    State per table: ``v`` float32 ``[rows]`` (the running mean of the row's mean squared gradient),
    optionally ``m`` in bfloat16 ``[rows, dim]`` (first moment; off by default). Versus dense fp32
    AdamW (``2 x rows x dim`` floats) this stores ``rows`` floats: 5.4 MB instead of 5.6 GB for the
    paper's embedding. Updates of sparse gradients are lazy (only the rows present are touched, as
    in ``torch.optim.SparseAdam``); in memory-lean mode the table gradients are rebuilt chunk by chunk of
    rows (:mod:`epiflow.train.lean`), so no dense ``[N, D]`` gradient ever exists.

    The learning rate is read from a torch optimiser ``lr_source`` (param group 0) so one scheduler
    drives both optimisers; ``lr_scale`` is this table's multiplier of it.
    """

    def __init__(self, weight: torch.Tensor, lr_source: torch.optim.Optimizer, lr_scale: float = 1.0,
                 betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: bool = False):
        self.weight = weight
        self.lr_source = lr_source
        self.lr_scale = float(lr_scale)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.step_count = 0
        self.v = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        self.m = (torch.zeros(weight.shape, dtype=torch.bfloat16, device=weight.device) if momentum else None)

    @property
    def lr(self) -> float:
        return float(self.lr_source.param_groups[0]["lr"]) * self.lr_scale

    def state_dict(self) -> dict:
        return {"step": self.step_count, "v": self.v, "m": self.m}

    def load_state_dict(self, sd: dict) -> None:
        self.step_count = int(sd["step"])
        self.v.copy_(sd["v"])
        if self.m is not None and sd.get("m") is not None:
            self.m.copy_(sd["m"])

    def state_bytes(self) -> int:
        return self.v.numel() * 4 + (0 if self.m is None else self.m.numel() * 2)

    def begin_step(self) -> None:
        self.step_count += 1

    @torch.no_grad()
    def update_rows(self, rows: torch.Tensor | slice, grad_rows: torch.Tensor) -> None:
        """Update the given (unique) rows with their gradient rows ``[len(rows), dim]``.

        ``rows`` may be a ``slice`` of contiguous rows (the decoder's chunks): the fp32 table is then
        updated in place through a view, without gathering a copy of the rows."""
        t = self.step_count
        g = grad_rows.float()
        lr = self.lr
        # the row's mean squared gradient, without a [rows, dim] temporary
        msq = torch.linalg.vector_norm(g, dim=1).square_().div_(g.shape[1])
        in_place = isinstance(rows, slice) and self.weight.dtype == torch.float32
        v = self.v[rows].mul_(self.beta2).add_(msq, alpha=1.0 - self.beta2)  # a slice: a view, updated in place
        if not isinstance(rows, slice):
            self.v[rows] = v
        vhat = v / (1.0 - self.beta2 ** t)
        if self.m is not None:
            m = self.m[rows].float().mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
            self.m[rows] = m.to(self.m.dtype)
            g = m / (1.0 - self.beta1 ** t)
        w = self.weight[rows] if in_place else self.weight[rows].float()
        if self.weight_decay:
            w.mul_(1.0 - lr * self.weight_decay)
        w.addcdiv_(g, (vhat.sqrt() + self.eps).unsqueeze(1), value=-lr)
        if not in_place:
            self.weight[rows] = w.to(self.weight.dtype)

    @torch.no_grad()
    def step_sparse(self, grad: torch.Tensor) -> None:
        """Lazy update from a sparse COO gradient of the table."""
        grad = grad.coalesce()
        idx = grad.indices()[0]
        if idx.numel():
            self.update_rows(idx, grad.values())

    @torch.no_grad()
    def step_lowrank(self, G: torch.Tensor, H: torch.Tensor, chunk: int = 65536) -> None:
        """Update all rows with the gradient ``G^T H`` (``G`` [R, rows], ``H`` [R, dim]), chunk by chunk."""
        n = self.weight.shape[0]
        Hf = H.float()
        for a in range(0, n, int(chunk)):
            b = min(n, a + int(chunk))
            self.update_rows(slice(a, b), G[:, a:b].float().t() @ Hf)


def finetune_param_groups(named_params, head_prefixes, lr: float, head_lr: float, weight_decay: float):
    """The one parameter-group policy of fine-tuning (:func:`epiflow.train.engine.fit`): parameters
    whose name starts with one of ``head_prefixes`` at ``head_lr``, the others at ``lr``; no weight
    decay on biases, norms, 1-d tensors and embeddings. Frozen parameters are left out."""
    head_prefixes = tuple(head_prefixes)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name.lower() or "embedding" in name or name.endswith(".bias")
        groups.setdefault((bool(head_prefixes) and name.startswith(head_prefixes), not no_decay), []).append(p)
    out = [{"params": ps, "lr": head_lr if is_head else lr, "weight_decay": weight_decay if decay else 0.0}
           for (is_head, decay), ps in sorted(groups.items())]
    if not out:
        raise ConfigError("no trainable parameters", field="model", fix="unfreeze the encoder or the head")
    return out
