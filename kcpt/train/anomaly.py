"""Anomaly rule: when an optimizer step must be undone (the loop then rolls back and lowers the LR).

Rule (per optimizer step, on values identical on every rank: the all-reduced loss and the global grad norm):

- the loss or the gradient norm (total L2 norm before clipping) is not finite → anomaly, always;
- otherwise, once ``min_history`` steps of the *current stage* were accepted (a per-stage warm-up: the first
  steps of a stage, and of an exam stage with its naturally noisy answer-only gradients, are never judged), with
  ``x = ln(norm)`` and ``m``, ``s`` the median and ``1.4826·MAD`` of ``ln`` of the last ``window`` accepted
  norms (``s`` floored at ``min_log_scale``):

      anomaly  ⇔  x − m > k_mad · s   AND   norm > min_spike_ratio · exp(q)

  with ``q`` the ``reference_quantile`` of those ``ln`` norms (0.9 by default; 0.5 is the median ``m``).
  A robust statistic on log norms: one earlier spike neither inflates the threshold (as a mean/std would) nor
  hides the next one, and heavy-tailed but ordinary norms (lognormal noise of exam batches with 1 to 500
  answer tokens) stay far inside it. The ratio condition keeps smooth, slowly drifting norms (tiny MAD) from
  being flagged for ordinary wiggles; it is taken against the window's upper tail because at a micro-batch of
  one or two rows the tail is made of single rows, not of the batch's noise (a row the model has not fit yet:
  10-23× the median norm in ordinary runs, while their MAD stays that of the bulk).

After an anomaly the loop restores the rollback point, multiplies the LR scale by ``lr_factor`` (never below
``min_lr_scale``: cuts do not compound without bound) and calls :meth:`AnomalyDetector.record_rollback`,
which raises :class:`~kcpt.errors.TrainingAborted` after ``max_rollbacks``: a deterministic verdict, which the
launcher ends the run with once (it is not a worker failure to retry).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from kcpt.config import AnomalyConfig
from kcpt.errors import TrainingAborted

MAD_TO_SIGMA = 1.4826
"""MAD of a normal distribution × this = its standard deviation."""


def _quantile(xs: list[float], q: float) -> float:
    """The ``q``-quantile of ``xs``, linear between order statistics (numpy's default; ``q`` 0.5: the median)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def _median(xs: list[float]) -> float:
    return _quantile(xs, 0.5)


class AnomalyDetector:
    def __init__(self, cfg: AnomalyConfig) -> None:
        self.cfg = cfg
        self.norms: deque[float] = deque(maxlen=cfg.window)
        self.rollbacks = 0
        self.last_reason: str | None = None

    def threshold(self) -> float | None:
        """Current grad-norm limit, or ``None`` during the stage's warm-up (< ``min_history`` accepted norms)."""
        if len(self.norms) < self.cfg.min_history:
            return None
        logs = [math.log(max(x, 1e-30)) for x in self.norms]
        m = _median(logs)
        s = max(MAD_TO_SIGMA * _median([abs(x - m) for x in logs]), self.cfg.min_log_scale)
        q = _quantile(logs, self.cfg.reference_quantile)
        return math.exp(min(max(m + self.cfg.k_mad * s, q + math.log(self.cfg.min_spike_ratio)), 700.0))

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Reason the step is an anomaly, or ``None`` when it may stand (then call :meth:`accept`)."""
        loss, grad_norm = float(loss), float(grad_norm)
        if not math.isfinite(loss):
            return f"loss is not finite ({loss})"
        if not math.isfinite(grad_norm):
            return f"grad norm is not finite ({grad_norm})"
        limit = self.threshold()
        if limit is not None and grad_norm > limit:
            return (f"grad norm {grad_norm:.4g} > {limit:.4g} (max(median·exp({self.cfg.k_mad:g}·MAD σ), "
                    f"{self.cfg.min_spike_ratio:g}·p{100 * self.cfg.reference_quantile:g}) of the norms of the last "
                    f"{len(self.norms)} accepted steps)")
        return None

    def accept(self, grad_norm: float) -> None:
        """Add the norm of an accepted step to the window."""
        self.norms.append(float(grad_norm))

    def next_lr_scale(self, lr_scale: float) -> float:
        """The LR scale after one more rollback: ``lr_scale · lr_factor``, floored at ``min_lr_scale``."""
        return max(lr_scale * self.cfg.lr_factor, min(lr_scale, self.cfg.min_lr_scale))

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
