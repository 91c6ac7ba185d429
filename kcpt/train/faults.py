"""Failure injection driven by ``train.faults`` (tests only; everything is off by default).

A fault targets a step (1-based) of one stage (``faults.stage``, default the first stage the run trains) and
fires once: NaN loss, a gradient spike (loss × factor), or an abrupt exit of one worker. The crash writes a
marker under ``<run_dir>/faults/`` first, so the replacement worker group does not crash again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kcpt.config import FaultConfig


class FaultInjector:
    def __init__(self, cfg: FaultConfig, *, stage: str, first_stage: str, rank: int, marker_dir: Path) -> None:
        self.cfg = cfg
        self.active = (cfg.stage or first_stage) == stage
        self.stage, self.rank, self.marker_dir = stage, rank, marker_dir

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
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        with open(self.marker_dir / f"fired-{kind}-{self.stage}-{step}", "a") as f:
            f.write("fired\n")

    def maybe_crash(self, step: int) -> None:
        """Exit this process abruptly (no cleanup, like a lost node) when the crash is due and not yet fired."""
        if not self.active or self.cfg.crash_at_step != step:
            return
        marker = self.marker_dir / f"crash-{self.stage}-{step}"
        if marker.exists():
            return
        if self.rank == self.cfg.crash_rank:
            self.marker_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text("fired\n")
            os._exit(17)
