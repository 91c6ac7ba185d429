"""Losses as ``(sum, count)`` pairs so that means can be token-weighted across micro-batches and workers.

Shapes: ``logits`` float[B, T, V], ``labels`` int[B, T] with ``-100`` (:data:`kcpt.data.types.IGNORE_INDEX`)
where no loss is taken. The causal shift is done here: the prediction at position ``t`` (``logits[:, t]``) is
scored against ``labels[:, t + 1]``. A token-weighted mean over workers is ``all_reduce(sum) / all_reduce(count)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kcpt.data.types import IGNORE_INDEX


def _shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    return logits[:, :-1, :], labels[:, 1:]


def token_ce_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of next-token cross-entropy (nats, computed in float32) over valid targets, and their count.

    Returns ``(loss_sum, count)``: scalar float32 tensor (differentiable w.r.t. ``logits``) and scalar int64
    tensor. With no valid target both are 0 (the sum stays attached to the graph).
    """
    lg, lb = _shift(logits, labels)
    lb = lb.long()
    loss_sum = F.cross_entropy(lg.reshape(-1, lg.size(-1)).float(), lb.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    count = (lb != IGNORE_INDEX).sum()
    return loss_sum, count


def kl_to_reference_sum(logits: Tensor, ref_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Sum over valid target positions of KL(p_ref ‖ p_θ) = Σ_v p_ref·(log p_ref − log p_θ), and their count.

    ``ref_logits`` [B, T, V] come from the frozen reference (no gradient flows into them). A position counts
    where the shifted label is not -100, i.e. the same positions :func:`token_ce_sum` scores.
    """
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)} must match logits {tuple(logits.shape)}")
    lg, lb = _shift(logits, labels)
    mask = lb != IGNORE_INDEX
    # no boolean indexing (a device→host sync on GPU): every position is computed, masked ones weigh 0
    logp = F.log_softmax(lg.float(), dim=-1)
    logp_ref = F.log_softmax(ref_logits[:, :-1, :].detach().float(), dim=-1)
    kl_row = (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    kl = torch.where(mask, kl_row, torch.zeros((), dtype=kl_row.dtype, device=kl_row.device)).sum()
    return kl, mask.sum()
