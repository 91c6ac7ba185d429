"""Failure injection driven by ``train.faults`` (tests only; everything is off by default).

A fault targets a step (1-based) of one stage (``faults.stage``, default the first stage the run trains) and
fires once: NaN loss, a gradient spike (loss × factor), or an abrupt exit of one worker. The crash writes a
marker under ``<run_dir>/faults/`` first, so the replacement worker group does not crash again.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from kcpt.config import FaultConfig


class Markers(Protocol):
    """Where fired faults are recorded (:class:`kcpt.train.rundir.RunDir`: ``faults/`` of the run, local or URI)."""

    def marker_exists(self, name: str) -> bool: ...

    def marker_append(self, name: str, line: str = "fired") -> None: ...


class FaultInjector:
    def __init__(self, cfg: FaultConfig, *, stage: str, first_stage: str, rank: int, markers: Markers) -> None:
        self.cfg = cfg
        self.active = (cfg.stage or first_stage) == stage
        self.stage, self.rank, self.markers = stage, rank, markers

    def perturb_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss to backpropagate at ``step`` (NaN or spiked when a fault is due; identical on all ranks).
        Rank 0 appends a line to ``faults/fired-<kind>-<stage>-<step>`` each time (tests count the attempts)."""
        if not self.active:
            return loss
        if self.cfg.nan_at_step == step:
            self._count("nan", step)
            return loss * float("nan")
        if self.cfg.grad_spike_at_step == step:
            self._count("spike", step)
            return loss * self.cfg.grad_spike_factor
        return loss

    def _count(self, kind: str, step: int) -> None:
        if self.rank != 0:
            return
        self.markers.marker_append(f"fired-{kind}-{self.stage}-{step}")

    def maybe_crash(self, step: int) -> None:
        """Exit this process abruptly (no cleanup, like a lost node) when the crash is due and not yet fired; raise
        a RuntimeError when ``raise_at_step`` is due."""
        if not self.active:
            return
        if self.cfg.raise_at_step == step and self.rank == self.cfg.crash_rank:
            raise RuntimeError(f"injected fault: stage {self.stage} step {step} (train.faults.raise_at_step)")
        if self.cfg.crash_at_step != step:
            return
        marker = f"crash-{self.stage}-{step}"
        if self.markers.marker_exists(marker):
            return
        if self.rank == self.cfg.crash_rank:
            self.markers.marker_append(marker)
            os._exit(17)
