"""Streaming per-source batches: bounded memory, a deterministic per-rank row order, an exact resume cursor.

A :class:`StreamBatches` reads the Parquet shards of one prepared dataset lazily — from a local directory or
straight from its URI (``s3://``, ``gs://``: :mod:`pyarrow.fs`, no download of the dataset) — one *window* of
row groups at a time, and keeps at most two windows decoded plus one being prefetched by a background thread.
Memory per source is O(window), not O(corpus).

Order (a pure function of ``seed``, the source name, the epoch, ``rank`` and ``world``):

- a *block* is one row group of one shard (prepared shards are written with row groups of
  :data:`kcpt.data.shards.ROW_GROUP_ROWS` rows);
- epoch ``e`` permutes the blocks with ``rng(seed, crc32(source), e, 1)``, then groups consecutive blocks of
  that order into windows of at least ``window_rows`` rows; the rows of window ``w`` are permuted with
  ``rng(seed, crc32(source), e, 2, w)`` (a seeded block shuffle + a seeded local shuffle);
- the epoch's sequence of ``N`` rows is cut into ``world`` contiguous equal parts of ``P = N // world`` rows
  (the last ``N mod world`` rows are skipped this epoch, and come back in another position next epoch);
  rank ``r`` reads only the windows that overlap its part — every rank holds exactly ``P`` rows per epoch, so
  all ranks run the same number of steps and none starves at a tail (:class:`kcpt.train.rank_order.RankOrder`,
  contiguous);
- batch ``c`` (the cursor) is positions ``[c·B, (c+1)·B)`` of the rank's endless concatenation of epochs: a
  source that runs out (a small exam set) starts its next epoch, in a new order, inside the same batch.

So batch ``c`` depends only on (seed, source, rank, world, B, c). The checkpoint stores the cursor and the ranges
of the current epoch's sequence no rank has read; a resumed run at the same layout continues with exactly the
batches an uninterrupted run would have seen — without reading the rows it skips — and one on another number of
workers or micro-batch size shares out those ranges, then reads whole epochs.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kcpt import storage
from kcpt.errors import InputError
from kcpt.train.batches import _COLUMNS, Batch, PackedRows, _column, to_batch
from kcpt.train.rank_order import RankOrder

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``(input_ids, position_ids, labels)`` int32 [rows, T]."""


@dataclass(frozen=True)
class Block:
    file: int
    row_group: int
    rows: int


def open_prepared(ref: str) -> tuple[Any, str, dict[str, Any]]:
    """``(pyarrow filesystem, base path, manifest)`` of the prepared dataset at ``ref`` (local directory or URI);
    an :class:`InputError` when it has no manifest."""
    import json

    import pyarrow.fs as pafs

    from kcpt.data.shards import MANIFEST

    if storage.is_uri(ref):
        fs, base = pafs.FileSystem.from_uri(ref.rstrip("/"))
    else:
        fs, base = pafs.LocalFileSystem(), str(storage.local_path(ref))
    base = base.rstrip("/")
    try:
        with fs.open_input_stream(f"{base}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, OSError):
        raise InputError("not a prepared dataset (no manifest.json); run `kcpt prepare` first", path=ref) from None
    return fs, base, manifest


class ShardReader:
    """The row groups of a prepared dataset's shards (local directory or URI), read one at a time."""

    def __init__(self, ref: str, *, seq_len: int, name: str) -> None:
        self.ref, self.seq_len, self.name = str(ref), seq_len, name
        self.fs, self.base, manifest = open_prepared(self.ref)
        self.files = [f"{self.base}/{s}" for s in manifest["shards"]]
        self._shown = [storage.join(self.ref, s) if storage.is_uri(self.ref) else f for s, f in
                       zip(manifest["shards"], self.files, strict=True)]  # a URI keeps its scheme in messages
        self.blocks: list[Block] = []
        self._meta: list[Any] = []
        for i in range(len(self.files)):
            md = self._metadata(i)
            self._meta.append(md)
            self.blocks += [Block(i, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)
                            if md.row_group(g).num_rows > 0]
        self.rows = sum(b.rows for b in self.blocks)
        if self.rows == 0:
            raise InputError("prepared dataset has no rows", path=self.ref)

    def _damaged(self, i: int, e: Exception) -> InputError:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return InputError(f"cannot read shard ({type(e).__name__}: {first}): the prepared copy of dataset "
                          f"'{self.name}' is damaged or incomplete; delete {self.ref} and run again (kcpt prepares it "
                          "anew)", path=self._shown[i])

    def _metadata(self, i: int) -> Any:
        try:
            with self.fs.open_input_file(self.files[i]) as f:
                return pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowException) as e:  # missing (FileNotFoundError), truncated (ArrowInvalid), ...
            raise self._damaged(i, e) from None

    def read(self, block: Block) -> Arrays:
        """One row group, decoded (the only data this reader holds; nothing is cached here)."""
        path = self.files[block.file]
        try:
            with self.fs.open_input_file(path) as f:
                table = pq.ParquetFile(f, metadata=self._meta[block.file]).read_row_group(
                    block.row_group, columns=list(_COLUMNS))
        except (OSError, pa.ArrowException) as e:
            raise self._damaged(block.file, e) from None
        ids, pos, lab = (_column(table, c, path, self.seq_len) for c in _COLUMNS)
        return ids, pos, lab

    def head(self, n: int) -> PackedRows:
        """The first ``n`` rows (file order): eval sets read no more than they use."""
        parts: list[Arrays] = []
        got = 0
        for b in self.blocks:
            if got >= n:
                break
            parts.append(self.read(b))
            got += b.rows
        ids, pos, lab = (np.concatenate([p[i] for p in parts])[:n] for i in range(3))
        return PackedRows(self.name, ids, pos, lab)


def _seed(seed: int, source: str, *rest: int) -> list[int]:
    return [seed, zlib.crc32(source.encode()), *rest]


@dataclass
class _Epoch:
    windows: list[list[Block]]
    starts: np.ndarray
    """Start position of every window in the epoch's row sequence, plus the total at the end."""


class StreamBatches:
    """Endless deterministic batches of one source for one rank, streamed (see the module docstring).

    Same interface as :class:`kcpt.train.batches.SourceBatches`: ``next()``, ``cursor``, ``epoch``,
    ``state_dict()`` / ``load_state_dict()``. ``transform(arrays)`` may rewrite a window's arrays (the ``full``
    loss on exam rows rebuilds the labels)."""

    def __init__(self, reader: ShardReader, *, rank: int, world: int, batch_size: int, seed: int,
                 window_rows: int, device: torch.device | str = "cpu", prefetch: bool = True,
                 transform: Callable[[Arrays], Arrays] | None = None) -> None:
        self.reader, self.rank, self.world, self.batch_size, self.seed = reader, rank, world, batch_size, seed
        self.name = reader.name
        self.window_rows, self.device, self.transform = max(1, window_rows), device, transform
        self.order = RankOrder(reader.rows, rank=rank, world=world, interleaved=False)
        self.per_rank = self.order.per_rank
        if self.per_rank == 0:
            raise InputError(f"dataset '{self.name}' has {reader.rows} rows, fewer than the {world} workers")
        self.cursor = 0
        self._epochs: OrderedDict[int, _Epoch] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], Arrays] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._pending: dict[tuple[int, int], Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"kcpt-stream-{self.name}") if prefetch else None

    # ----------------------------------------------------------------- order
    def _epoch(self, e: int) -> _Epoch:
        if e not in self._epochs:
            order = np.random.default_rng(_seed(self.seed, self.name, e, 1)).permutation(len(self.reader.blocks))
            windows: list[list[Block]] = [[]]
            size = 0
            for i in order:
                if size >= self.window_rows:
                    windows.append([])
                    size = 0
                b = self.reader.blocks[int(i)]
                windows[-1].append(b)
                size += b.rows
            starts = np.cumsum([0, *(sum(b.rows for b in w) for w in windows)])
            self._epochs[e] = _Epoch(windows, starts)
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def _locate(self, pos: int) -> tuple[int, int, int, int]:
        """Rank-local stream position → (epoch, window, row index inside that window's arrays, g)."""
        e, g = self.order.locate(pos)
        ep = self._epoch(e)
        w = int(np.searchsorted(ep.starts, g, side="right")) - 1
        return e, w, int(self._perm(e, w)[g - ep.starts[w]]), g

    def _perm(self, e: int, w: int) -> np.ndarray:
        if (e, w) not in self._perms:
            ep = self._epoch(e)
            n = int(ep.starts[w + 1] - ep.starts[w])
            self._perms[(e, w)] = np.random.default_rng(_seed(self.seed, self.name, e, 2, w)).permutation(n)
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return self._perms[(e, w)]

    def _next_window(self, pos: int, e: int, w: int, g: int) -> tuple[int, int] | None:
        """The window this rank reads after ``(e, w)``, where stream position ``pos`` reads row ``g``; None if it
        comes back to ``(e, w)``."""
        ahead = min(int(self._epoch(e).starts[w + 1]) - g, self.order.run(pos))
        e2, g2 = self.order.locate(pos + ahead)
        w2 = int(np.searchsorted(self._epoch(e2).starts, g2, side="right")) - 1
        return None if (e2, w2) == (e, w) else (e2, w2)

    # ----------------------------------------------------------------- windows
    def _load(self, blocks: list[Block]) -> Arrays:
        parts = [self.reader.read(b) for b in blocks]
        arrays = tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
        return self.transform(arrays) if self.transform is not None else arrays  # type: ignore[return-value]

    def _window(self, e: int, w: int, pos: int, g: int) -> Arrays:
        """Window ``w`` of epoch ``e``, where stream position ``pos`` reads row ``g``."""
        key = (e, w)
        if key not in self._windows:
            fut = self._pending.pop(key, None)
            self._windows[key] = fut.result() if fut is not None else self._load(self._epoch(e).windows[w])
            while len(self._windows) > 2:
                self._windows.popitem(last=False)
            if self._pool is not None:
                nk = self._next_window(pos, e, w, g)
                if nk is not None and nk not in self._windows and nk not in self._pending:
                    self._pending = {nk: self._pool.submit(self._load, self._epoch(nk[0]).windows[nk[1]])}
        else:
            self._windows.move_to_end(key)
        return self._windows[key]

    # ----------------------------------------------------------------- batches
    def rows_at(self, cursor: int) -> PackedRows:
        """The rows of batch number ``cursor`` on this rank (in batch order)."""
        start = cursor * self.batch_size
        picked = []
        for pos in range(start, start + self.batch_size):
            e, w, i, g = self._locate(pos)
            arr = self._window(e, w, pos, g)
            picked.append(tuple(a[i] for a in arr))
        ids, pos_, lab = (np.stack([p[k] for p in picked]) for k in range(3))
        return PackedRows(self.name, ids, pos_, lab)

    def next(self) -> Batch:
        rows = self.rows_at(self.cursor)
        self.cursor += 1
        return to_batch(rows, np.arange(len(rows)), self.device)

    @property
    def epoch(self) -> float:
        return self.order.epoch(self.cursor * self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """``epoch`` and ``remaining``: the ranges of that epoch's sequence no rank has read
        (:meth:`RankOrder.remaining`), which a run on any number of workers, at any micro-batch size, goes on from."""
        return {"cursor": self.cursor, **self.order.state(self.cursor * self.batch_size, self.batch_size)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        if "remaining" not in state:  # written before kcpt recorded the rest of the epoch: batches of one size
            bs = int(state.get("batch_size", self.batch_size))
            if bs != self.batch_size:
                raise InputError(f"source '{self.name}': the checkpoint's stream cursor counts batches of {bs} "
                                 f"rows, this run uses {self.batch_size}; resume with the same micro-batch size "
                                 "(the stage's micro_batch_size or train.micro_batch_size)")
            return
        self.order.load(self.cursor * self.batch_size, state, self.name)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
