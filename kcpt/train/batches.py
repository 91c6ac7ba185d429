"""Deterministic per-source batch streams with a resumable cursor, and padded eval batches.

Why not a Ray Data stream: Ray Data cannot checkpoint a stream position (ray#48224) and a shuffled split can
hand workers short batches mid-stream (ray#66085). Each worker therefore reads the prepared Parquet shards
(memory-mapped, in file order) and takes its rows by index:

- epoch ``e`` of a source is a permutation of all row indices drawn from ``seed``/source/``e``;
- worker ``rank`` of ``world`` takes positions ``rank, rank + world, ...`` of the first ``world·(N // world)``
  (every worker holds the same number of rows, so every worker runs the same number of steps);
- batch ``c`` (the cursor) is rows ``[c·B, (c+1)·B)`` of the worker's endless concatenation of epochs — no
  short batch ever, and batch ``c`` is a pure function of (seed, rank, world, B, c), so a resumed run that
  restores the cursor sees exactly the batches an uninterrupted run would.

Batch tensors: ``input_ids``, ``position_ids``, ``labels`` int64 [B, T]; labels are -100 where no loss;
``cu_seqlens`` / ``max_seqlen``: document boundaries for varlen attention (:mod:`kcpt.model.attention`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kcpt.data.types import IGNORE_INDEX
from kcpt.errors import InputError
from kcpt.train.rank_order import RankOrder

Batch = dict[str, torch.Tensor]
_COLUMNS = ("input_ids", "position_ids", "labels")


@dataclass
class PackedRows:
    """All rows of one prepared dataset as int32 arrays [N, T]."""

    name: str
    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def shard_files(prepared_dir: str | Path) -> list[Path]:
    files = sorted(Path(prepared_dir).glob("part-*.parquet"))
    if not files:
        raise InputError("no part-*.parquet shards in prepared dataset", path=str(prepared_dir))
    return files


def _column(table: pa.Table, name: str, path: str, seq_len: int | None) -> np.ndarray:
    col = table.column(name).combine_chunks()
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    n = len(col)
    if n == 0:
        return np.zeros((0, seq_len or 0), dtype=np.int32)
    t = int(lengths[0]) if seq_len is None else seq_len
    bad = np.nonzero(lengths != t)[0]
    if bad.size:
        raise InputError(f"row {int(bad[0])} has {int(lengths[bad[0]])} positions, expected {t}", path=path,
                         field=name)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return values.reshape(n, t)


def load_packed_rows(prepared_dir: str | Path, name: str | None = None,
                     seq_len: int | None = None) -> PackedRows:
    """Read every ``part-*.parquet`` shard of a prepared dataset (sorted by file name) into memory."""
    return _decode_rows(prepared_dir, name, seq_len)


def mapped_packed_rows(prepared_dir: str | Path, name: str | None = None, seq_len: int | None = None) -> PackedRows:
    """All rows of a prepared dataset as read-only memory maps of uncompressed ``.npy`` files: decoded once per
    node (file lock) into node scratch, keyed by the dataset's manifest hash, then mapped by every rank, so
    ranks on one node share the page cache instead of each holding a decoded copy (the ``memory`` loader)."""
    from kcpt import storage
    from kcpt.data.shards import prepared_sha256

    key = f"{prepared_sha256(prepared_dir)[:24]}-T{seq_len or 0}"
    root = storage.scratch_root() / "rows" / key
    with storage.file_lock(root.parent / f".{key}.lock"):
        if not (root / "done").is_file():
            rows = _decode_rows(prepared_dir, name, seq_len)
            root.mkdir(parents=True, exist_ok=True)
            for c in _COLUMNS:
                tmp = root / f".{c}.npy.tmp"
                with open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(getattr(rows, c)))
                tmp.replace(root / f"{c}.npy")
            (root / "done").write_text("ok")
    arrays = {c: np.load(root / f"{c}.npy", mmap_mode="r") for c in _COLUMNS}
    return PackedRows(name or Path(prepared_dir).name, **arrays)


def _decode_rows(prepared_dir: str | Path, name: str | None, seq_len: int | None) -> PackedRows:
    files = shard_files(prepared_dir)
    parts: dict[str, list[np.ndarray]] = {c: [] for c in _COLUMNS}
    for f in files:
        table = pq.read_table(f, columns=list(_COLUMNS), memory_map=True)
        for c in _COLUMNS:
            parts[c].append(_column(table, c, str(f), seq_len))
        seq_len = seq_len if seq_len is not None else (parts["input_ids"][-1].shape[1] or None)
    arrays = {c: np.concatenate(v) for c, v in parts.items()}
    if len(arrays["input_ids"]) == 0:
        raise InputError("prepared dataset has no rows", path=str(prepared_dir))
    return PackedRows(name or Path(prepared_dir).name, **arrays)


def full_labels(input_ids: np.ndarray, position_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Labels for the ``full`` loss on exam rows: every token is a target except segment starts
    (``position_ids == 0``) and the padding after the row's last labelled token. Shapes [N, T]."""
    out = input_ids.astype(np.int32, copy=True)
    out[position_ids == 0] = IGNORE_INDEX
    t = labels.shape[1]
    has = labels != IGNORE_INDEX
    last = np.where(has.any(axis=1), t - 1 - np.argmax(has[:, ::-1], axis=1), -1)
    out[np.arange(t)[None, :] > last[:, None]] = IGNORE_INDEX
    return out


def to_batch(rows: PackedRows, idx: np.ndarray, device: torch.device | str = "cpu") -> Batch:
    """Rows ``idx`` as int64 tensors on ``device``, plus the documents' boundaries of the flattened batch computed
    on the host (``cu_seqlens`` int32 on ``device``, ``max_seqlen`` a host scalar): what varlen flash attention
    needs, with no device→host read."""
    from kcpt.model.attention import host_cu_seqlens

    pin = torch.device(device).type == "cuda"  # pinned host memory: the copies overlap with compute

    def put(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)

    batch = {c: put(getattr(rows, c)[idx].astype(np.int64)) for c in _COLUMNS}
    cu, max_len = host_cu_seqlens(rows.position_ids[idx])
    batch["cu_seqlens"] = put(cu)
    batch["max_seqlen"] = torch.tensor(max_len)
    return batch


def _stream_seed(seed: int, source: str, epoch: int) -> list[int]:
    return [seed, zlib.crc32(source.encode()), epoch]


class SourceBatches:
    """Endless deterministic batches of one source for one worker; ``cursor`` = batches consumed so far.

    Epoch ``e`` is a seeded permutation of all rows; rank ``r`` takes every ``world``-th of its first
    ``world·⌊N/world⌋`` (:class:`kcpt.train.rank_order.RankOrder`, interleaved), so the ranks together read a prefix
    of the permutation: a run resumed on another number of workers or micro-batch size goes on with its next rows."""

    def __init__(self, rows: PackedRows, *, rank: int, world: int, batch_size: int, seed: int,
                 device: torch.device | str = "cpu") -> None:
        self.rows, self.rank, self.world, self.batch_size, self.seed = rows, rank, world, batch_size, seed
        self.device = device
        self.order = RankOrder(len(rows), rank=rank, world=world, interleaved=True)
        self.per_rank = self.order.per_rank
        if self.per_rank == 0:
            raise InputError(f"dataset '{rows.name}' has {len(rows)} rows, fewer than the {world} workers")
        self.cursor = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(_stream_seed(self.seed, self.rows.name, epoch))
                          .permutation(len(self.rows)))
        return self._perm[1]

    def indices(self, cursor: int) -> np.ndarray:
        """Row indices of batch number ``cursor`` on this worker."""
        start = cursor * self.batch_size
        out = np.empty(self.batch_size, dtype=np.int64)
        for i in range(self.batch_size):
            e, g = self.order.locate(start + i)
            out[i] = self._permutation(e)[g]
        return out

    def next(self) -> Batch:
        idx = self.indices(self.cursor)
        self.cursor += 1
        return to_batch(self.rows, idx, self.device)

    @property
    def epoch(self) -> float:
        return self.order.epoch(self.cursor * self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """``epoch`` and ``remaining``: the ranges of that epoch's permutation no rank has read."""
        return {"cursor": self.cursor, **self.order.state(self.cursor * self.batch_size, self.batch_size)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        if "remaining" not in state:  # written before kcpt recorded the rest of the epoch
            return
        self.order.load(self.cursor * self.batch_size, state, self.rows.name)


def eval_batches(rows: PackedRows, *, rank: int, world: int, batch_size: int, max_rows: int | None = None,
                 device: torch.device | str = "cpu") -> list[Batch]:
    """This worker's share of an eval set (rows ``i % world == rank`` of the first ``max_rows``), in batches.

    Every worker gets the same number of batches (ZeRO-3 needs every rank in every forward): missing rows are
    filled with copies of row 0 whose labels are all -100, so they add nothing to the loss sums.
    """
    n = len(rows) if max_rows is None else min(len(rows), max_rows)
    mine = np.arange(rank, n, world)
    per_rank = -(-n // world)
    n_batches = -(-per_rank // batch_size)
    out = []
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        pad = per_rank - len(mine) if b == n_batches - 1 else 0
        batch = to_batch(rows, np.concatenate([idx, np.zeros(pad, dtype=np.int64)]), device)
        if pad > 0:
            batch["labels"][len(idx):] = IGNORE_INDEX
        out.append(batch)
    return out
