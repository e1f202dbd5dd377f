"""Pretraining objectives (SPEC §4): CCA, SR and RLM, all BCE-with-logits.

The losses here return **sums**; the training loop divides them by denominators computed over the
whole optimiser step (all ranks, all accumulation micro-batches, see
:func:`epiflow.train.data.step_normalizers`), which equals the authors' mean reduction when a step
is one batch and keeps the update independent of how the step is split.

SR never builds the dense ``[batch x vocabulary]`` target: with ``s(x) = softplus(x)``,

    BCE(x, y; p) = (1 - y) s(x) + p y s(-x)
    sum_ij BCE = sum_ij s(x_ij) + sum_{(i,j): y_ij = 1} [p s(-x_ij) - s(x_ij)]

so the positives are gathered from the logits by their flat index (on the device).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def k_for_epoch(epoch: int, schedule: Sequence[int] = (1, 2, 5), epochs_per_block: int | None = None,
                total_epochs: int = 12) -> int:
    """CCA negatives per positive for 0-based ``epoch``: the paper's 1 / 2 / 5 for epochs 1-4 / 5-8 /
    9-12, i.e. ``schedule`` spread over equal blocks of ``total_epochs`` (or ``epochs_per_block``)."""
    schedule = tuple(int(k) for k in schedule)
    if epochs_per_block is None:
        epochs_per_block = max(1, -(-int(total_epochs) // len(schedule)))
    return schedule[min(int(epoch) // int(epochs_per_block), len(schedule) - 1)]


def sr_loss_sum(logits: torch.Tensor, pos_rows: torch.Tensor, pos_cols: torch.Tensor,
                pos_weight: float = 100.0) -> torch.Tensor:
    """Sum over all ``B x N`` entries of BCE-with-logits(pos_weight) against the binary
    accessibility given by the positive (row, column) pairs, without a dense target."""
    x = logits.float()
    total = F.softplus(x).sum()
    if pos_rows.numel():
        xp = x[pos_rows, pos_cols]
        total = total + (pos_weight * F.softplus(-xp) - F.softplus(xp)).sum()
    return total


def sr_multinomial_sum(logits: torch.Tensor, pos_rows: torch.Tensor, pos_cols: torch.Tensor) -> torch.Tensor:
    """Depth-invariant signal reconstruction (an option, not the paper's SR): the decoder logits of a
    cell are a softmax over the cCREs and each accessible cCRE is one draw of a multinomial, so

        loss_i = mean_{j accessible in i} [logsumexp_k x_ik - x_ij]

    summed over the cells (divide by the number of cells). Adding a constant to a cell's logits does
    not change it, so the cell embedding need not encode how many cCREs are open (the per-cell
    library size of scVI / cisTopic), where the paper's BCE asks for exactly that."""
    x = logits.float()
    if pos_rows.numel() == 0:
        return x.sum() * 0.0
    lse = torch.logsumexp(x, dim=1)
    # lse.index_select, not lse[pos_rows]: the rows repeat, and the backward of advanced indexing with
    # repeated indices adds with parallel atomics on CPU (run-to-run differences with >= 2 threads)
    nll = lse.index_select(0, pos_rows) - x[pos_rows, pos_cols]
    counts = torch.bincount(pos_rows, minlength=x.shape[0]).clamp_min(1).to(x.dtype)
    return (nll / counts[pos_rows]).sum()


def sr_mse_sum(pred: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Imputation's signal reconstruction: sum of squared errors of ``pred`` ``[B, N]`` against a
    sparse target (``values`` at ``(rows, cols)``, 0 elsewhere), without a dense target:
    ``sum x^2 + sum_nz [(x - v)^2 - x^2]`` (divide by ``B * N`` for the mean)."""
    x = pred.float()
    total = (x * x).sum()
    if rows.numel():
        xp = x[rows, cols]
        total = total + ((xp - values.float()) ** 2 - xp * xp).sum()
    return total


from .config import SR_OBJECTIVES  # noqa: E402,F401 (declared with the settings)


def sr_norm_key(sr_objective: str) -> str:
    """The step denominator of the SR sum: every cell x cCRE entry (paper BCE) or every cell."""
    return "cells" if sr_objective == "multinomial" else "sr"


def sr_loss_dense_reference(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 100.0):
    """The dense formulation (for tests): mean BCE-with-logits with ``pos_weight``."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(),
                                              pos_weight=torch.tensor(float(pos_weight)))


def bce_sum(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Sum of BCE-with-logits with ``pos_weight`` (CCA with pos_weight = K, RLM with 1)."""
    return F.binary_cross_entropy_with_logits(logits.float().reshape(-1), labels.float().reshape(-1),
                                              pos_weight=torch.tensor(float(pos_weight), device=logits.device),
                                              reduction="sum")


def pos_rows_cols(pos_ptr: torch.Tensor, pos_ccre: torch.Tensor):
    """(row, column) of every positive from the CSR of accessible cCREs."""
    lens = pos_ptr[1:] - pos_ptr[:-1]
    rows = torch.repeat_interleave(torch.arange(len(lens), device=pos_ccre.device), lens.to(pos_ccre.device))
    return rows, pos_ccre


def rlm_token_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """Positions of cCRE tokens (id > 3), row-major, as the authors' RLM head selects them."""
    return input_ids > 3
