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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from kcpt.data.types import IGNORE_INDEX

DEFAULT_WINDOW = 10_000
DEFAULT_MIN_PIECE = 16
"""Shortest piece a long document's tail is cut into to fill a gap."""


@dataclass
class Segment:
    """Token ids and labels of one unit that must stay whole (``len(input_ids) == len(labels) <= seq_len``).

    ``labels`` hold the token id where the token is trained on and -100 where it is not (exam prompt).
    ``source`` is the dataset name written to the row.
    """

    input_ids: Sequence[int]
    labels: Sequence[int]
    source: str = ""
    splittable: bool = False
    """True for the tail chunk of a raw document longer than ``seq_len``: the packer may cut it further to fill
    gaps (it already starts mid-document). Documents ≤ ``seq_len`` and exam items are never cut."""

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

    Every token is a label (the packer masks each segment's first token). When the document is longer than
    ``seq_len``, its last chunk is ``splittable`` (the packer may cut it to fill gaps).
    """
    out = []
    for i in range(0, len(ids), seq_len):
        chunk = ids[i:i + seq_len]
        out.append(Segment(chunk, chunk, source))  # raw text: labels are the ids (shared, never mutated)
    if len(out) > 1:
        out[-1].splittable = True
    return out


def tokenize_documents(texts: Sequence[str], tokenizer, seq_len: int, source: str = "", *,
                       copies: Callable[[int, list[int]], int] | None = None) -> list[Segment]:
    """Tokenize raw texts in one batch call, append EOS to each, and chunk to ≤ ``seq_len``.

    The tokenizer's own special tokens (e.g. Llama's BOS) are kept; EOS is appended unless already last.
    Special-token strings inside the text (a literal ``<|endoftext|>`` in a web page) are plain text
    (``split_special_tokens``): a document's only EOS is the appended one. ``copies(i, ids)``: how many times
    document ``i`` (token ids ``ids``) is written (default once; see :class:`NewTokenOversampler`).
    """
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    out: list[Segment] = []
    for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=True, split_special_tokens=True)["input_ids"]):
        if not ids or ids[-1] != eos:
            ids = [*ids, eos]
        segs = chunk_document(ids, seq_len, source)
        for _ in range(copies(i, ids) if copies is not None else 1):
            out.extend(segs)
    return out


@dataclass
class NewTokenOversampler:
    """``copies`` rule of :func:`tokenize_documents`: a document holding a token added by vocabulary expansion
    (id ≥ ``first_new_id``) is written ``factor`` times, so the new embeddings get more updates during CPT;
    ``documents`` counts the documents oversampled so far."""

    first_new_id: int
    factor: int
    documents: int = 0

    def __call__(self, i: int, ids: list[int]) -> int:
        if self.factor > 1 and max(ids) >= self.first_new_id:
            self.documents += 1
            return self.factor
        return 1


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


class _OpenRows:
    """Rows being filled, indexed by remaining capacity: buckets of row indices per capacity plus a sorted list
    of the capacities that have rows (bisect: O(log seq_len) per operation)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.members: list[list[int]] = []
        self.buckets: dict[int, list[int]] = {}
        self.caps: list[int] = []

    def _take(self, k: int) -> tuple[int, int]:
        cap = self.caps[k]
        bucket = self.buckets[cap]
        row = bucket.pop()
        if not bucket:
            del self.buckets[cap]
            self.caps.pop(k)
        return row, cap

    def best_fit(self, n: int) -> tuple[int, int] | None:
        """Remove and return (row, capacity) of the fullest row that still has room for ``n``, if any."""
        k = bisect.bisect_left(self.caps, n)
        return self._take(k) if k < len(self.caps) else None

    def emptiest(self) -> tuple[int, int] | None:
        """Remove and return (row, capacity) of the row with the most room, if any."""
        return self._take(len(self.caps) - 1) if self.caps else None

    def new(self) -> tuple[int, int]:
        self.members.append([])
        return len(self.members) - 1, self.capacity

    def put(self, row: int, cap: int, item: int, n: int) -> None:
        """Add item ``item`` of length ``n`` to ``row`` (which had ``cap`` free) and file the row again."""
        self.members[row].append(item)
        left = cap - n
        if left > 0:
            if left in self.buckets:
                self.buckets[left].append(row)
            else:
                self.buckets[left] = [row]
                bisect.insort(self.caps, left)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) from best-fit decreasing; every length must be in ``[1, capacity]``.

    Each item goes into the open bin with the smallest remaining capacity that fits, else a new bin. Bins are
    returned in the order they were opened.
    """
    rows = _OpenRows(capacity)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if not 0 < n <= capacity:
            raise ValueError(f"segment length {n} outside [1, {capacity}]")
        row, cap = rows.best_fit(n) or rows.new()
        rows.put(row, cap, i, n)
    return rows.members


def pack_window(segments: Sequence[Segment], seq_len: int, pad_id: int, *,
                min_piece: int = DEFAULT_MIN_PIECE) -> list[PackedRow]:
    """Pack one window of segments (each ≤ ``seq_len``) into rows.

    Whole segments (documents ≤ ``seq_len``, exam items) are placed by best-fit decreasing. Then the
    ``splittable`` ones (the tail chunk of a document longer than ``seq_len``), longest first, go into the
    fullest row they fit in; a tail that fits nowhere is cut to fill the emptiest open row (every piece, the
    rest included, at least ``min_piece`` tokens; each a new segment: position ids restart, first label masked)
    before it opens a new row. Tails of long documents thus fill the gaps best-fit leaves.
    """
    pieces: list[Segment] = list(segments)
    rows = _OpenRows(seq_len)
    whole = [i for i, s in enumerate(pieces) if not s.splittable or len(s) == seq_len]
    tails = [i for i, s in enumerate(pieces) if s.splittable and len(s) != seq_len]
    for i in sorted(whole, key=lambda i: -len(pieces[i])):
        n = len(pieces[i])
        if not 0 < n <= seq_len:
            raise ValueError(f"segment length {n} outside [1, {seq_len}]")
        row, cap = rows.best_fit(n) or rows.new()
        rows.put(row, cap, i, n)
    for i in sorted(tails, key=lambda i: -len(pieces[i])):
        seg = pieces[i]
        start, left = 0, len(seg)
        if not 0 < left <= seq_len:
            raise ValueError(f"segment length {left} outside [1, {seq_len}]")
        while left:
            found, n = rows.best_fit(left), left
            if found is None:  # cut a piece for the emptiest row, leaving ≥ min_piece for the rest
                found = rows.emptiest()
                if found is not None:
                    n = found[1] if left - found[1] >= min_piece else left - min_piece
                    if n < min_piece:
                        rows.put(found[0], found[1], -1, 0)  # give the row back untouched
                        found, n = None, left
            row, cap = found or rows.new()
            if start == 0 and n == left:
                rows.put(row, cap, i, n)
            else:
                pieces.append(Segment(seg.input_ids[start:start + n], seg.labels[start:start + n], seg.source, True))
                rows.put(row, cap, len(pieces) - 1, n)
            start += n
            left -= n
    return [_build_row([pieces[i] for i in members if i >= 0], seq_len, pad_id) for members in rows.members]


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
