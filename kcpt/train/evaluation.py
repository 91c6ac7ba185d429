"""Held-out losses, token-weighted across workers.

``eval_loss`` runs the model over this worker's eval batches (:func:`kcpt.train.batches.eval_batches`), sums
the next-token CE over labels ≠ -100 and the count, all-reduces both over the process group (when one is
initialised) and returns ``sum / count`` in nats. Raw rows carry full labels, exam rows answer-only labels,
so the same function gives the raw val loss and the exam answer-only val loss.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from kcpt.model.attention import model_inputs
from kcpt.train import fused_loss
from kcpt.train.batches import Batch
from kcpt.train.losses import token_ce_sum


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum of each value over all workers (identity without a process group); float64 on the wire."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device | str = "cpu", *,
              fused: bool = False) -> dict[str, float]:
    """``{"loss": mean nats, "tokens": count}`` over all workers' batches; ``loss`` is NaN when count is 0.

    Every worker must call this with the same number of batches (collectives inside ZeRO-3 forwards). Sums and
    counts stay on the device until the end (one host read per eval set). ``fused``: the CE comes from the final
    hidden states in chunks (:mod:`kcpt.train.fused_loss`), never from full-vocabulary logits.
    """
    was_training = model.training
    model.eval()
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    for b in batches:
        inputs = model_inputs(model, b)
        if fused:
            _, s, c, _ = fused_loss.with_loss_head(model)(**inputs, kcpt_loss={"labels": b["labels"]})
        else:
            out = model(**inputs)
            s, c = token_ce_sum(out.logits, b["labels"])
        acc += torch.stack([s.double(), c.double()])
    model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(acc, op=dist.ReduceOp.SUM)
    total, count = acc.tolist()
    count = int(count)
    return {"loss": total / count if count else math.nan, "tokens": count}


def ppl(loss: float) -> float:
    """exp(loss), +inf on overflow, NaN for NaN."""
    if loss != loss:
        return math.nan
    return math.exp(loss) if loss < 700 else math.inf
