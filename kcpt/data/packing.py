"""Tokenized segments → packed rows of exactly ``seq_len`` tokens (best-fit decreasing, document boundaries kept).

A *segment* is one document (or one ≤ ``seq_len`` chunk of a long document) or one exam item. Packing places
whole segments into rows; it never splits a segment. In a row (see :mod:`kcpt.data.types` for the contract):

- ``position_ids`` restart at 0 at every segment start, so attention (transformers builds the block-diagonal mask
  from ``position_ids`` when ``use_cache=False``) never crosses segments;
- ``labels`` are the segment's labels except the first token of every segment, which is -100 (no token predicts
  the first token of another document); exam prompt tokens are already -100 in the segment;
- the tail is padding: ``pad_id``, labels -100, position ids continuing the last segment's count.

Best-fit decreasing works on bounded windows of segments (``window``) so a stream of any length is packed in
bounded memory: sort the window by length (longest first) and put each segment into the open row with the
smallest remaining capacity that still fits (a bisect over the distinct remaining capacities; O(n log seq_len)).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from kcpt.data.types import IGNORE_INDEX

DEFAULT_WINDOW = 10_000


@dataclass
class Segment:
    """Token ids and labels of one unit that must stay whole (``len(input_ids) == len(labels) <= seq_len``).

    ``labels`` hold the token id where the token is trained on and -100 where it is not (exam prompt).
    ``source`` is the dataset name written to the row.
    """

    input_ids: Sequence[int]
    labels: Sequence[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


EncodedSegment = Segment
"""An exam item after rendering and tokenization (prompt labels -100)."""


@dataclass
class PackedRow:
    """One training row; arrays are int32 of length ``seq_len``; ``length`` = non-pad tokens."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    source: str
    length: int
    segments: int


@dataclass
class PackStats:
    """Counts of a packing run. ``efficiency`` = non-pad tokens / all row positions."""

    seq_len: int
    rows: int = 0
    tokens: int = 0
    segments: int = 0
    label_tokens: int = 0

    @property
    def positions(self) -> int:
        return self.rows * self.seq_len

    @property
    def padding(self) -> int:
        return self.positions - self.tokens

    @property
    def efficiency(self) -> float:
        return self.tokens / self.positions if self.rows else 0.0

    def add_row(self, row: PackedRow) -> None:
        self.rows += 1
        self.tokens += row.length
        self.segments += row.segments
        self.label_tokens += int((row.labels != IGNORE_INDEX).sum())

    def merge(self, other: PackStats) -> None:
        self.rows += other.rows
        self.tokens += other.tokens
        self.segments += other.segments
        self.label_tokens += other.label_tokens

    def to_dict(self) -> dict[str, float | int]:
        return {"rows": self.rows, "tokens": self.tokens, "padding": self.padding, "segments": self.segments,
                "label_tokens": self.label_tokens, "pack_efficiency": round(self.efficiency, 6)}


def chunk_document(ids: Sequence[int], seq_len: int, source: str = "") -> list[Segment]:
    """Split a raw document's ids (EOS already appended) into segments of ≤ ``seq_len`` tokens; none dropped.

    Every token is a label (the packer masks each segment's first token).
    """
    return [Segment(ids[i:i + seq_len], ids[i:i + seq_len], source) for i in range(0, len(ids), seq_len)]


def tokenize_documents(texts: Sequence[str], tokenizer, seq_len: int, source: str = "") -> list[Segment]:
    """Tokenize raw texts in one batch call, append EOS to each, and chunk to ≤ ``seq_len``.

    The tokenizer's own special tokens (e.g. Llama's BOS) are kept; EOS is appended unless already last.
    """
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    out: list[Segment] = []
    for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
        if not ids or ids[-1] != eos:
            ids = [*ids, eos]
        out.extend(chunk_document(ids, seq_len, source))
    return out


def _build_row(members: list[Segment], seq_len: int, pad_id: int) -> PackedRow:
    ids = np.full(seq_len, pad_id, dtype=np.int32)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int32)
    pos = np.empty(seq_len, dtype=np.int32)
    at = 0
    for seg in members:
        n = len(seg)
        ids[at:at + n] = seg.input_ids
        labels[at:at + n] = seg.labels
        labels[at] = IGNORE_INDEX
        pos[at:at + n] = np.arange(n, dtype=np.int32)
        at += n
    if at < seq_len:  # padding continues the last segment's count (it comes last: no real token attends to it)
        start = (int(pos[at - 1]) + 1) if at else 0
        pos[at:] = np.arange(start, start + seq_len - at, dtype=np.int32)
    return PackedRow(ids, pos, labels, members[0].source if members else "", at, len(members))


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) from best-fit decreasing; every length must be in ``[1, capacity]``.

    Open bins are kept in buckets by remaining capacity; a sorted list of the non-empty capacities is searched
    with bisect for the smallest one that fits. Bins are returned in the order they were opened.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    remaining: list[int] = []
    buckets: dict[int, list[int]] = {}  # remaining capacity -> bin indices
    caps: list[int] = []  # sorted non-empty remaining capacities (> 0)
    for i in order:
        n = lengths[i]
        if not 0 < n <= capacity:
            raise ValueError(f"segment length {n} outside [1, {capacity}]")
        k = bisect.bisect_left(caps, n)
        if k < len(caps):
            cap = caps[k]
            bucket = buckets[cap]
            b = bucket.pop()
            if not bucket:
                del buckets[cap]
                caps.pop(k)
        else:
            b = len(bins)
            bins.append([])
            remaining.append(capacity)
            cap = capacity
        bins[b].append(i)
        left = cap - n
        remaining[b] = left
        if left > 0:
            if left in buckets:
                buckets[left].append(b)
            else:
                buckets[left] = [b]
                bisect.insort(caps, left)
    return bins


def pack_window(segments: Sequence[Segment], seq_len: int, pad_id: int) -> list[PackedRow]:
    """Pack one window of segments with best-fit decreasing; every segment must fit in ``seq_len``."""
    bins = best_fit_decreasing([len(s) for s in segments], seq_len)
    return [_build_row([segments[i] for i in b], seq_len, pad_id) for b in bins]


def pack_segments(segments: Iterable[Segment], seq_len: int, pad_id: int, *, window: int = DEFAULT_WINDOW,
                  stats: PackStats | None = None) -> Iterator[PackedRow]:
    """Stream packed rows: best-fit decreasing over consecutive windows of ``window`` segments.

    Rows have exactly ``seq_len`` positions. A segment longer than ``seq_len`` is an error (chunk raw documents
    first with :func:`chunk_document`; exam items too long are skipped before packing). ``stats`` (optional) is
    updated with every row yielded.
    """
    buf: list[Segment] = []

    def flush() -> Iterator[PackedRow]:
        for row in pack_window(buf, seq_len, pad_id):
            if stats is not None:
                stats.add_row(row)
            yield row
        buf.clear()

    for seg in segments:
        if len(seg) == 0:
            continue
        buf.append(seg)
        if len(buf) >= window:
            yield from flush()
    if buf:
        yield from flush()


def check_row(input_ids: Sequence[int], position_ids: Sequence[int], labels: Sequence[int], seq_len: int) -> list[str]:
    """Problems with one packed row against the contract (empty list = valid): lengths, position ids that start
    at 0 and either restart at 0 or increase by one, and -100 on the first token of every segment."""
    problems = []
    if not len(input_ids) == len(position_ids) == len(labels) == seq_len:
        return [f"lengths {len(input_ids)}/{len(position_ids)}/{len(labels)} != seq_len {seq_len}"]
    pos = np.asarray(position_ids)
    lab = np.asarray(labels)
    if pos[0] != 0:
        problems.append("position_ids[0] != 0")
    step = np.diff(pos)
    bad = np.nonzero((pos[1:] != 0) & (step != 1))[0]
    if bad.size:
        problems.append(f"position_ids jump at {int(bad[0]) + 1}")
    starts = np.nonzero(pos == 0)[0]
    if (lab[starts] != IGNORE_INDEX).any():
        problems.append("a segment's first token has a label")
    return problems
