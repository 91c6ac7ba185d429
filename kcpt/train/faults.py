"""Failure injection driven by ``train.faults`` (tests only; everything is off by default).

A fault targets a step (1-based) of one stage (``faults.stage``, default the first stage the run trains) and
fires once: NaN loss, a gradient spike (loss × factor), or an abrupt exit of one worker. The crash writes a
marker under ``<run_dir>/faults/`` first, so the replacement worker group does not crash again.

Checkpoint writer faults (any stage; rank 0's writer thread): a slow write that waits for training to progress
(:meth:`FaultInjector.checkpoint_write_gate`, released by :meth:`FaultInjector.progress` or
:meth:`FaultInjector.release_writes`: an order of events, no clock), and a failing write.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from kcpt.config import FaultConfig
from kcpt.errors import InputError


class Markers(Protocol):
    """Where fired faults are recorded (:class:`kcpt.train.rundir.RunDir`: ``faults/`` of the run, local or URI)."""

    def marker_exists(self, name: str) -> bool: ...

    def marker_append(self, name: str, line: str = "fired") -> None: ...


class FaultInjector:
    def __init__(self, cfg: FaultConfig, *, stage: str, first_stage: str, rank: int, markers: Markers) -> None:
        self.cfg = cfg
        self.active = (cfg.stage or first_stage) == stage
        self.stage, self.rank, self.markers = stage, rank, markers
        self._step = 0
        self._joins = 0
        self._cond = threading.Condition()

    # ----------------------------------------------------------------- checkpoint writer (rank 0's thread)
    def progress(self, step: int) -> None:
        """The training thread starts ``step`` (wakes a held checkpoint write)."""
        with self._cond:
            self._step = step
            self._cond.notify_all()

    def release_writes(self) -> None:
        """The training thread joins the checkpoint writer: a held write goes on at once (no deadlock)."""
        with self._cond:
            self._joins += 1
            self._cond.notify_all()

    def checkpoint_write_gate(self, step: int, path: Path | str) -> Callable[[], None]:
        """Called on the training thread when the checkpoint saved at ``step`` is handed to the writer; returns
        what the writer thread calls before it writes. With ``checkpoint_write_lag_steps`` that waits until
        training reached ``step + lag`` or the loop joins the writer, and appends
        ``"<stage> <step> began-at <training step> by progress|join"`` to ``faults/checkpoint-writes``; with
        ``checkpoint_write_error_at_step == step`` it raises an ``OSError`` naming ``path``."""
        lag, joins = self.cfg.checkpoint_write_lag_steps, self._joins

        def gate() -> None:
            if lag is not None:
                with self._cond:
                    # the long timeout only keeps the writer of a dead training thread from hanging the process
                    self._cond.wait_for(lambda: self._step >= step + lag or self._joins > joins, timeout=300)
                    how = "progress" if self._step >= step + lag else "join"
                    at = self._step
                self.markers.marker_append("checkpoint-writes", f"{self.stage} {step} began-at {at} by {how}")
            if self.cfg.checkpoint_write_error_at_step == step:
                raise OSError(f"injected checkpoint write failure at {path} "
                              "(train.faults.checkpoint_write_error_at_step)")

        return gate

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
        a RuntimeError when ``raise_at_step`` is due, an InputError when ``input_error_at_step`` is."""
        if not self.active:
            return
        if self.cfg.raise_at_step == step and self.rank == self.cfg.crash_rank:
            raise RuntimeError(f"injected fault: stage {self.stage} step {step} (train.faults.raise_at_step)")
        if self.cfg.input_error_at_step == step and self.rank == self.cfg.crash_rank:
            self.markers.marker_append(f"input-error-{self.stage}-{step}")
            raise InputError(f"injected fault: stage {self.stage} step {step} (train.faults.input_error_at_step)")
        if self.cfg.hang_at_step == step and self.rank == self.cfg.crash_rank \
                and not self.markers.marker_exists(f"hang-{self.stage}-{step}"):
            self.markers.marker_append(f"hang-{self.stage}-{step}")
            while True:  # until the process is killed
                time.sleep(1.0)
        if self.cfg.crash_at_step != step:
            return
        marker = f"crash-{self.stage}-{step}"
        if self.markers.marker_exists(marker):
            return
        if self.rank == self.cfg.crash_rank:
            self.markers.marker_append(marker)
            os._exit(17)
