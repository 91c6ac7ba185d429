"""Which row of an epoch each position of one rank's stream reads, and a record of what all ranks have read that
does not depend on the number of ranks — so a run resumed on another number of workers, or another micro-batch
size, reads every row of the current epoch once: none twice, none left out.

Rows are named by their index ``g`` in an epoch's *sequence* (``0 ≤ g < rows``): the loader maps it to a row
(the memory loader through a seeded permutation, the stream loader through its block and window shuffle). Each
epoch is split over the ``world`` ranks, ``share = ⌊n / world⌋`` rows each, the last ``n mod world`` rows of the
epoch's sequence skipped this epoch:

- ``contiguous`` (the stream loader: a rank reads only the windows of its part) — rank ``r`` reads positions
  ``[r·share, (r+1)·share)`` of the sequence;
- ``interleaved`` (the memory loader) — rank ``r`` reads positions ``r, r + world, r + 2·world, …``: after every
  rank read ``k`` rows the ranks together have read the sequence's first ``world·k``, whatever ``world`` is.

A rank's stream is the concatenation of its parts of epochs 0, 1, 2, …; position ``p`` of it is its ``p``-th row.
A resumed rank first reads its part of the *rest* of the checkpoint's epoch — :meth:`RankOrder.remaining` at the
save, a list of ``[start, end)`` ranges of that epoch's sequence that no rank had read, split over this run's ranks
the same way — then epochs ``e + 1, e + 2, …`` whole. With the same ranks and positions this is exactly the stream
an uninterrupted run reads; with another world size the rest of the epoch is shared out anew (the interleaved split
keeps even the order of the rows: every step takes the same rows as the run that went on, when each step has as
many rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kcpt.errors import InputError

Ranges = list[tuple[int, int]]
"""``[start, end)`` ranges of one epoch's sequence, in order; their concatenation is what they name."""


def ranges_length(ranges: Sequence[Sequence[int]]) -> int:
    return sum(int(t) - int(s) for s, t in ranges)


def sub_ranges(ranges: Ranges, a: int, b: int) -> Ranges:
    """Items ``[a, b)`` of the concatenation of ``ranges``, as ranges."""
    out: Ranges = []
    off = 0
    for s, t in ranges:
        lo, hi = max(a, off), min(b, off + t - s)
        if lo < hi:
            out.append((s + lo - off, s + hi - off))
        off += t - s
        if off >= b:
            break
    return out


def _merged(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for s, t in ranges:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], t)
        elif t > s:
            out.append((s, t))
    return out


def _item(ranges: Ranges, k: int) -> tuple[int, int]:
    """``(item k of the concatenation, how many items from it on are consecutive in the sequence)``."""
    for s, t in ranges:
        if k < t - s:
            return s + k, t - s - k
        k -= t - s
    raise IndexError(k)


class RankOrder:
    """Positions of one rank's endless stream over epochs of ``rows`` rows (see the module docstring)."""

    def __init__(self, rows: int, *, rank: int, world: int, interleaved: bool) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.rows, self.rank, self.world, self.interleaved = rows, rank, world, interleaved
        self.per_rank = rows // world
        """This rank's rows of a whole epoch."""
        self._start = 0
        """Stream position of the first row of the leading (partly read) epoch."""
        self._lead_epoch = 0
        self._lead: Ranges = [(0, rows)]
        self._lead_share = self.per_rank

    def _where(self, pos: int) -> tuple[int, Ranges, int, int]:
        """``(epoch, its ranges, the share of each rank, k)``: position ``pos`` is this rank's ``k``-th row there."""
        rel = pos - self._start
        if rel < 0:
            raise ValueError(f"position {pos} precedes the resumed stream's start {self._start}")
        if rel < self._lead_share:
            return self._lead_epoch, self._lead, self._lead_share, rel
        e, k = divmod(rel - self._lead_share, self.per_rank)
        return self._lead_epoch + 1 + e, [(0, self.rows)], self.per_rank, k

    def _index(self, k: int, share: int) -> int:
        return k * self.world + self.rank if self.interleaved else self.rank * share + k

    def locate(self, pos: int) -> tuple[int, int]:
        """``(epoch, g)``: position ``pos`` of this rank's stream is row ``g`` of that epoch's sequence."""
        e, ranges, share, k = self._where(pos)
        return e, _item(ranges, self._index(k, share))[0]

    def run(self, pos: int) -> int:
        """How many positions from ``pos`` on read consecutive rows of one epoch's sequence (``contiguous`` only)."""
        e, ranges, share, k = self._where(pos)
        return min(_item(ranges, self._index(k, share))[1], share - k)

    def remaining(self, pos: int) -> tuple[int, Ranges]:
        """``(epoch, ranges)`` no rank has read once every rank has read ``pos`` positions (all ranks are at the same
        position of a source: they draw the same sources, each its own batch of the same size)."""
        e, ranges, share, k = self._where(pos)
        if self.interleaved:
            return e, _merged(sub_ranges(ranges, k * self.world, share * self.world))
        out: Ranges = []
        for r in range(self.world):
            out += sub_ranges(ranges, r * share + k, (r + 1) * share)
        return e, _merged(out)

    def epoch(self, pos: int) -> float:
        """Epochs read so far (fractional)."""
        e, _, share, k = self._where(pos)
        return e + 1 - (share - k) / self.per_rank

    def resume(self, pos: int, epoch: int, ranges: Sequence[Sequence[int]]) -> None:
        """From stream position ``pos`` on, read this rank's part of ``ranges`` of ``epoch`` (what
        :meth:`remaining` gave at the save, on any number of ranks), then whole epochs. Raises ValueError when
        the ranges do not fit this epoch size."""
        rs = [(int(s), int(t)) for s, t in ranges]
        if epoch < 0 or any(not 0 <= s <= t <= self.rows for s, t in rs) or any(
                a[1] > b[0] for a, b in zip(rs, rs[1:], strict=False)):
            raise ValueError(f"epoch {epoch}, ranges {rs[:4]}… do not name rows of an epoch of {self.rows}")
        self._start, self._lead_epoch, self._lead = pos, epoch, rs
        self._lead_share = ranges_length(rs) // self.world

    def state(self, pos: int, batch_size: int) -> dict[str, Any]:
        """A loader's checkpoint entry after this rank read ``pos`` positions in batches of ``batch_size``:
        ``epoch`` and ``remaining`` (:meth:`remaining`), JSON-ready."""
        e, remaining = self.remaining(pos)
        return {"epoch": e, "remaining": [list(r) for r in remaining], "batch_size": batch_size, "world": self.world}

    def load(self, pos: int, state: dict[str, Any], source: str) -> None:
        """:meth:`resume` from a :meth:`state` entry; an :class:`InputError` naming ``source`` when it does not fit."""
        try:
            self.resume(pos, int(state["epoch"]), state["remaining"])
        except ValueError as e:
            raise InputError(f"source '{source}': the checkpoint's data position does not fit this dataset of "
                             f"{self.rows} rows ({e}); resume with the prepared data it was written with") from None
