"""Anomaly rule and the in-memory stable state used to roll back.

Rule (per optimizer step, before the update is applied): the step is an anomaly when the loss is not finite,
the gradient norm (total L2 norm before clipping, as ``clip_grad_norm_`` returns it) is not finite, or — once
``min_history`` norms are known — the norm exceeds ``max(mean + k_sigma · std, min_spike_ratio · mean)``
(population std) of the last ``window``
*accepted* norms. The loop then skips the update, restores the :class:`StableSnapshot`, lowers the
LR (:func:`kcpt.train.schedule.scale_base_lr` by ``lr_factor``, after the restore) and calls
:meth:`AnomalyDetector.record_rollback`, which aborts the run after ``max_rollbacks``.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from typing import Any

import torch

from kcpt.config import AnomalyConfig
from kcpt.errors import TrainingAborted


class AnomalyDetector:
    def __init__(self, cfg: AnomalyConfig) -> None:
        self.cfg = cfg
        self.norms: deque[float] = deque(maxlen=cfg.window)
        self.rollbacks = 0
        self.last_reason: str | None = None

    def threshold(self) -> float | None:
        """Current grad-norm limit, or ``None`` while fewer than ``min_history`` norms are known."""
        if len(self.norms) < self.cfg.min_history:
            return None
        n = len(self.norms)
        mean = sum(self.norms) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.norms) / n)
        return max(mean + self.cfg.k_sigma * std, self.cfg.min_spike_ratio * mean)

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Reason the step is an anomaly, or ``None`` when it may be applied (then call :meth:`accept`)."""
        loss, grad_norm = float(loss), float(grad_norm)
        if not math.isfinite(loss):
            return f"loss is not finite ({loss})"
        if not math.isfinite(grad_norm):
            return f"grad norm is not finite ({grad_norm})"
        limit = self.threshold()
        if limit is not None and grad_norm > limit:
            return (f"grad norm {grad_norm:.4g} > {limit:.4g} (max(mean + {self.cfg.k_sigma:g}·std, "
                    f"{self.cfg.min_spike_ratio:g}·mean) of the last "
                    f"{len(self.norms)} accepted steps)")
        return None

    def accept(self, grad_norm: float) -> None:
        """Add the norm of an applied step to the window."""
        self.norms.append(float(grad_norm))

    def record_rollback(self, reason: str = "") -> None:
        """Count one rollback; raise :class:`TrainingAborted` once more than ``max_rollbacks`` happened."""
        self.rollbacks += 1
        self.last_reason = reason or self.last_reason
        if self.rollbacks > self.cfg.max_rollbacks:
            raise TrainingAborted(
                f"training aborted after {self.rollbacks} anomalies that each needed a rollback "
                f"(train.anomaly.max_rollbacks = {self.cfg.max_rollbacks})"
                + (f"; last: {self.last_reason}" if self.last_reason else "")
                + ". Lower the learning rate (stage lr.peak) or check the training data.")

    def state_dict(self) -> dict[str, Any]:
        return {"norms": list(self.norms), "rollbacks": self.rollbacks, "last_reason": self.last_reason}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.norms = deque((float(x) for x in d["norms"]), maxlen=self.cfg.window)
        self.rollbacks = int(d["rollbacks"])
        self.last_reason = d.get("last_reason")


def _clone_to_cpu(obj: Any) -> Any:
    """Deep copy of a nested state: tensors detached and cloned to CPU, everything else deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _clone_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class StableSnapshot:
    """In-memory copy (CPU) of the last stable model + optimizer + scheduler state, for rollback.

    Works for plain and DDP-wrapped modules (capture and restore the same object). Restoring yields
    bit-identical parameters and optimizer state; the snapshot is not consumed (restore may be repeated).
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self._model: dict[str, torch.Tensor] | None = None
        self._optim: dict[str, Any] | None = None
        self._sched: dict[str, Any] | None = None

    @property
    def captured(self) -> bool:
        return self.step is not None

    def capture(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int) -> None:
        self._model = _clone_to_cpu(model.state_dict())
        self._optim = _clone_to_cpu(optimizer.state_dict())
        self._sched = _clone_to_cpu(scheduler.state_dict()) if scheduler is not None else None
        self.step = step

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
        """Load the snapshot back; returns the step it was captured at."""
        if self.step is None or self._model is None or self._optim is None:
            raise RuntimeError("no stable snapshot captured yet: capture one before the first step")
        model.load_state_dict(self._model)
        # optimizer.load_state_dict may keep CPU tensors as they are: hand it a fresh copy so that in-place
        # updates never alter the snapshot.
        optimizer.load_state_dict(_clone_to_cpu(self._optim))
        if scheduler is not None and self._sched is not None:
            scheduler.load_state_dict(copy.deepcopy(self._sched))
        return self.step
