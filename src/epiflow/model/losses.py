"""Training objectives with the semantics of the authors' criteria (mean reduction).

* :func:`sr_loss` - signal reconstruction, BCE-with-logits of the decoder logits ``[B, n_cCRE]``
  against the binary accessibility of every cCRE, ``pos_weight`` 100, mean over all ``B * n_cCRE``
  entries. :func:`sr_loss_sparse` gives the same value from the positives only (row / cCRE index
  pairs on the device), so no dense ``[B, n_cCRE]`` target is ever built on the host.
* :func:`cca_loss`, :func:`rlm_loss` - BCE-with-logits over the queries / cCRE tokens, mean.
* :func:`focal_loss` - ``mean((1 - exp(-CE))^gamma * CE) * alpha`` (authors' classifier, alpha 1, gamma 2).
* :func:`classification_loss` - plain cross-entropy (the paper's linear classifier).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pw(pos_weight: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(pos_weight, device=like.device).to(like.dtype)


def bce_with_logits(logits: torch.Tensor, target: torch.Tensor, pos_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``BCEWithLogitsLoss(pos_weight=...)`` with mean reduction."""
    target = target.to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=_pw(pos_weight, logits))


def sr_loss(
    signal_logits: torch.Tensor, target: torch.Tensor, pos_weight: float | torch.Tensor = 100.0
) -> torch.Tensor:
    """Signal reconstruction with a dense 0/1 target ``[B, n_cCRE]``."""
    return bce_with_logits(signal_logits, target, pos_weight)


def sr_loss_sparse(
    signal_logits: torch.Tensor,
    pos_rows: torch.Tensor,
    pos_cols: torch.Tensor,
    pos_weight: float | torch.Tensor = 100.0,
) -> torch.Tensor:
    """Signal reconstruction from the positives only.

    ``pos_rows`` / ``pos_cols``: LongTensors of equal length, the (cell, cCRE index j) pairs that are
    accessible (unique per cell). Uses ``BCE(x, 0) = softplus(x)`` and ``BCE(x, 1) = w * softplus(-x)``:
    ``loss = (sum softplus(x) + sum_pos [w * softplus(-x) - softplus(x)]) / (B * N)``.
    """
    x = signal_logits.float()
    w = _pw(pos_weight, x)
    xp = x[pos_rows.long(), pos_cols.long()]
    total = F.softplus(x).sum() + (w * F.softplus(-xp) - F.softplus(xp)).sum()
    return (total / x.numel()).to(signal_logits.dtype)


def positives_from_input_ids(input_ids: torch.Tensor, num_special: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cCRE indices)`` of the cCRE tokens in a padded batch (for :func:`sr_loss_sparse`).

    Note: the authors' SR target covers ALL accessible cCREs of a cell, not only its <= 8,190 input
    tokens; build the pairs from the full sentence when a cell was truncated."""
    r, c = torch.nonzero(input_ids >= num_special, as_tuple=True)
    return r, input_ids[r, c].long() - num_special


def dense_target(
    rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], device: str | torch.device | None = None
) -> torch.Tensor:
    """Dense 0/1 target ``[B, n_cCRE]`` from positive pairs (tests and small models only)."""
    out = torch.zeros(shape, device=device if device is not None else rows.device)
    out[rows.long(), cols.long()] = 1.0
    return out


def cca_loss(cca_logits: torch.Tensor, target: torch.Tensor, pos_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Cell-cCRE alignment: BCE over all queries of the batch (``pos_weight`` = K of the schedule)."""
    return bce_with_logits(cca_logits, target, pos_weight)


def rlm_loss(rlm_logits: torch.Tensor, target: torch.Tensor, pos_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Replaced-LM: BCE over all cCRE tokens of the batch (1 = the token is accessible in the cell)."""
    return bce_with_logits(rlm_logits, target, pos_weight)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 1.0) -> torch.Tensor:
    """Focal loss of the authors' classifier: ``alpha * mean((1 - p_t)^gamma * CE)``, ``p_t = exp(-CE)``."""
    ce = F.cross_entropy(logits, target.long(), reduction="none")
    return alpha * ((1.0 - torch.exp(-ce)) ** gamma * ce).mean()


def classification_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (the paper's single-linear-layer classifier)."""
    return F.cross_entropy(logits, target.long())
