"""How one optimizer step's rows are laid out over the ranks of the process group.

A fixed-size run (``train.min_workers`` unset) trains as configured: every rank reads ``train.grad_accum``
micro-batches per step. An elastic run keeps the configured step whatever number of workers Ray Train gives it:
the step is ``B = train.grad_accum · train.num_workers`` micro-batches of the stage's micro-batch size, and on
``world`` ranks

- the first ``active`` ranks read them, ``active`` the largest divisor of ``B`` that is at most ``world``, each
  accumulating ``B / active`` micro-batches (the data loaders split each epoch over ``active`` ranks);
- the other ``world − active`` ranks are *spare*: they run as many padding micro-batches (every label -100, no
  target: no loss, no gradient, no token counted), so that every rank takes part in the same collectives.

The loss is a token sum over the step's micro-batches divided by the step's all-reduced token count
(:func:`kcpt.train.loop.accumulate_step`), so padding changes nothing: the update is the full-size run's. The
cost of an uneven world is compute only: a step takes ``B / active`` micro-batch rounds instead of
``⌈B / world⌉``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kcpt.config import KcptConfig


@dataclass(frozen=True)
class StepLayout:
    world: int
    """Ranks in the process group."""
    active: int
    """Ranks ``0 … active-1`` read data; the rest run padding micro-batches."""
    grad_accum: int
    """Micro-batches per rank per step (padding ones included on a spare rank)."""

    def reads(self, rank: int) -> bool:
        return rank < self.active

    @property
    def micro_batches(self) -> int:
        """Micro-batches of real rows per step, over every rank."""
        return self.active * self.grad_accum

    def describe(self, configured_world: int) -> str:
        """One line for the console and the log: how this world runs the configured step."""
        spare = self.world - self.active
        line = (f"elastic: {self.world} of {configured_world} workers; each step's {self.micro_batches} "
                f"micro-batches as {self.active} reading worker{'s' if self.active != 1 else ''} × "
                f"{self.grad_accum}")
        if spare:
            line += (f", {spare} worker{'s' if spare != 1 else ''} running padding micro-batches (weightless: "
                     f"{self.micro_batches} do not divide over {self.world})")
        return line


def step_micro_batches(cfg: KcptConfig) -> int | None:
    """``B``, the micro-batches of every step of an elastic run (``grad_accum · num_workers``); None for a
    fixed-size run, whose every rank reads."""
    t = cfg.train
    return None if t.min_workers is None else t.grad_accum * t.num_workers


def readers(micro_batches: int | None, world: int) -> int:
    """Reading ranks of a world of ``world`` ranks: the largest divisor of ``micro_batches`` (``B``) that is at
    most ``world``; all of them when ``micro_batches`` is None (a fixed-size run)."""
    if micro_batches is None:
        return world
    return max(d for d in range(1, min(world, micro_batches) + 1) if micro_batches % d == 0)


def step_layout(cfg: KcptConfig, world: int) -> StepLayout:
    """The layout of every step of ``cfg``'s plan on ``world`` ranks (see the module docstring)."""
    b = step_micro_batches(cfg)
    if b is None:
        return StepLayout(world=world, active=world, grad_accum=cfg.train.grad_accum)
    active = readers(b, world)
    return StepLayout(world=world, active=active, grad_accum=b // active)


class PaddingBatches:
    """A spare rank's stream: micro-batches of ``batch_size`` rows of ``seq_len`` tokens whose every label is -100
    (token 0, positions ``0 … seq_len-1``), made by the same :func:`~kcpt.train.batches.to_batch` as real rows (so
    varlen flash attention finds its ``cu_seqlens``); no data is read and there is no position to save."""

    def __init__(self, name: str, *, batch_size: int, seq_len: int, device: torch.device | str) -> None:
        import numpy as np

        from kcpt.train.batches import PackedRows, to_batch

        self.name = name
        shape = (batch_size, seq_len)
        positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy()
        rows = PackedRows(name, np.zeros(shape, np.int32), positions, np.full(shape, -100, np.int32))
        self.batch = to_batch(rows, np.arange(batch_size), device)
        self.epoch = 0.0

    def next(self) -> dict[str, torch.Tensor]:
        return self.batch

    def state_dict(self) -> dict[str, object]:
        return {"padding": True}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Nothing to restore: a spare rank reads no rows (the reading ranks hold the source's position)."""
