"""Training sources as Ray Datasets: ``TorchTrainer(datasets=…)`` on the driver, ``get_dataset_shard`` on the
workers (``data.loader: ray_data``).

Driver (:func:`source_datasets`): one Ray Dataset per training source of the plan, read from the prepared
Parquet shards (local directory or URI) by Ray Data's own reader, one read task per shard file. The
:func:`data_config` splits every one equally across the reading workers (every worker, but for the spare ranks of
an elastic run's world: :mod:`kcpt.train.layout`) (``streaming_split(equal=True)``) with
``preserve_order``, so which rows each split gets is a function of the block sequence alone (Ray's
``OutputSplitter`` then hands each block to the split with the fewest rows so far, no locality reordering) —
the same run to run, whatever the consumers' timing. A *small* source (at most
``data.ray_data_materialize_rows`` rows: exam items, the demo corpus) is read once into Ray's object store
(shared by a node's workers) and repeated so that one Ray Data execution holds at least
:data:`MIN_ROWS_PER_EXECUTION` rows: a new execution costs 0.1-3 s, which an epoch of a few dozen rows would pay
every few steps.

Order of a source (a pure function of the seed, the source name, the rank and the world size):

- the shard files, permuted once by ``rng(seed, crc32(source))``; within a file, row groups in order;
- execution ``e`` of the worker's split, its rows shuffled in a local buffer of ``data.stream_window_rows`` rows
  seeded by ``(seed, crc32(source), e, rank)`` (``iter_batches(local_shuffle_seed=…)``), so every epoch comes
  in a new seeded order;
- micro-batches of ``B`` rows are cut from the endless concatenation of executions: a source that runs out
  starts its next execution inside the same batch, so every batch has exactly ``B`` rows, and every rank holds
  the same number of rows per execution (``equal=True``), so no rank starves while another has data.

Resume: the checkpoint stores ``(epoch, rows)`` — the execution being read and the rows of it already handed
out; a resumed worker starts that execution and discards ``rows`` rows (re-reading at most one execution of the
source: a Ray Data iterator cannot seek, ray#48224) and then continues with exactly the rows an uninterrupted
run would have seen.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from kcpt.errors import InputError
from kcpt.train.batches import _COLUMNS, Batch, PackedRows, to_batch
from kcpt.train.streams import open_prepared

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``(input_ids, position_ids, labels)`` int32 [rows, T]."""

MIN_ROWS_PER_EXECUTION = 4096
"""A materialized small source is repeated until one Ray Data execution holds at least this many rows."""

LOADER = "ray_data"

log = logging.getLogger(__name__)

STALL_S = 60.0
"""Seconds without a row from Ray Data after which a worker says so (:class:`RayDataBatches` ``on_stall``)."""


def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def shard_paths(ref: str) -> tuple[list[str], int, Any]:
    """``(shard paths in file order, rows, pyarrow filesystem)`` of the prepared dataset at ``ref`` (local or URI),
    from its manifest."""
    fs, base, manifest = open_prepared(ref)
    return [f"{base}/{s}" for s in manifest["shards"]], int(manifest.get("rows", 0)), fs


def source_dataset(name: str, ref: str, *, seed: int, materialize_rows: int, read_cpus: float) -> Any:
    """The Ray Dataset of training source ``name`` (prepared at ``ref``): shard files in a seeded order, one read
    task per file; materialized and repeated when it has at most ``materialize_rows`` rows (module docstring)."""
    import ray.data

    files, rows, fs = shard_paths(ref)
    if rows <= 0:
        raise InputError("prepared dataset has no rows", path=ref)
    order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(files))
    ds = ray.data.read_parquet([files[i] for i in order], filesystem=fs, override_num_blocks=len(files),
                               num_cpus=read_cpus).select_columns(list(_COLUMNS))
    if rows <= materialize_rows:
        ds = ds.materialize()
        repeat = math.ceil(MIN_ROWS_PER_EXECUTION / rows)
        if repeat > 1:  # one block of `repeat` copies in order (< 2 * MIN_ROWS_PER_EXECUTION rows): a union of
            # `repeat` datasets took 5 s per execution for 410 copies, this 0.05 s
            import pyarrow as pa

            table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
            ds = ray.data.from_arrow(pa.concat_tables([table] * repeat).combine_chunks())
    return ds


def source_datasets(cfg: Any, prepared: dict[str, str], names: list[str]) -> dict[str, Any]:
    """``TorchTrainer(datasets=…)`` for the training sources ``names`` of the plan."""
    d = cfg.data
    return {n: source_dataset(n, str(prepared[n]), seed=cfg.train.seed, materialize_rows=d.ray_data_materialize_rows,
                              read_cpus=d.ray_data_read_cpus) for n in names}


def data_config(names: list[str], micro_batches: int | None = None) -> Any:
    """Every source split equally across the reading workers (all of them; on an elastic run's world, those of
    :func:`kcpt.train.layout.readers` for ``micro_batches`` per step), in a preserved (deterministic) order."""
    from ray.data import ExecutionOptions

    from kcpt.train.ray_data_config import ReadersDataConfig

    return ReadersDataConfig(micro_batches, datasets_to_split=list(names),
                             execution_options=ExecutionOptions(preserve_order=True))


def execution_rows(rows: int, materialize_rows: int) -> int:
    """Rows of one Ray Data execution of a source of ``rows`` rows (the repeat of a small source included)."""
    return rows * (math.ceil(MIN_ROWS_PER_EXECUTION / rows) if rows <= materialize_rows else 1)


class _Watchdog:
    """One daemon thread per process that calls ``on_stall`` of every watched :class:`RayDataBatches` whose pull has
    waited ``stall_s`` (once per wait). A pull costs two attribute writes, not a timer thread (~0.1 ms each)."""

    _thread: threading.Thread | None = None
    _watched: weakref.WeakSet[RayDataBatches] = weakref.WeakSet()
    _lock = threading.Lock()
    PERIOD_S = 0.5

    @classmethod
    def watch(cls, b: RayDataBatches) -> None:
        with cls._lock:
            cls._watched.add(b)
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._run, name="kcpt-ray-data-watchdog", daemon=True)
                cls._thread.start()

    @classmethod
    def _run(cls) -> None:
        told: weakref.WeakKeyDictionary[RayDataBatches, float] = weakref.WeakKeyDictionary()
        while True:
            time.sleep(cls.PERIOD_S)
            now = time.monotonic()
            for b in list(cls._watched):
                since = b.waiting_since
                if since is not None and now - since >= b.stall_s and told.get(b) != since:
                    told[b] = since
                    try:
                        b._stalled()
                    except Exception:  # noqa: BLE001 - telling must not end the watch
                        log.exception("telling a stalled Ray Data read failed")


class RayDataBatches:
    """Endless micro-batches of one source for one rank, pulled from ``get_dataset_shard(source)``.

    Same interface as :class:`kcpt.train.streams.StreamBatches`: ``next()`` → a :data:`Batch` of exactly
    ``batch_size`` rows, ``cursor`` (batches handed out), ``epoch`` (passes over the source, fractional),
    ``state_dict()`` / ``load_state_dict()``, ``close()``. ``shard`` is the worker's ``DataIterator``;
    ``source_rows`` the source's rows (for ``epoch``); ``transform(arrays)`` may rewrite a batch's arrays.
    ``on_stall(message)`` is called (from a watchdog thread) once per wait when Ray Data has given no rows for
    ``stall_s`` seconds (to within 0.5 s; the wait goes on: a stalled read is told, not broken off)."""

    def __init__(self, shard: Any, *, name: str, rank: int, world: int, batch_size: int, seed: int,
                 shuffle_rows: int, source_rows: int, device: torch.device | str = "cpu",
                 transform: Callable[[Arrays], Arrays] | None = None, prefetch_batches: int = 2,
                 on_stall: Callable[[str], None] | None = None, stall_s: float = STALL_S) -> None:
        self.shard, self.name, self.rank, self.world = shard, name, rank, world
        self.on_stall, self.stall_s = on_stall, stall_s
        self.waiting_since: float | None = None
        """``time.monotonic()`` when the pull in progress began (None between pulls)."""
        if on_stall is not None:
            _Watchdog.watch(self)
        self.batch_size, self.seed, self.shuffle_rows = batch_size, seed, shuffle_rows
        self.per_rank_pass = max(1, source_rows // world)
        self.device, self.transform, self.prefetch_batches = device, transform, prefetch_batches
        self.cursor = 0
        self.exec_epoch = 0
        """The execution (epoch of the Ray Dataset) being read."""
        self.rows = 0
        """Rows of execution ``exec_epoch`` already handed out."""
        self._skip = 0
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self._buf: Arrays | None = None

    # ----------------------------------------------------------------- reading
    def _open(self) -> None:
        self.close()
        gen = self.shard.iter_batches(
            batch_size=self.batch_size, batch_format="numpy", prefetch_batches=self.prefetch_batches,
            local_shuffle_buffer_size=self.shuffle_rows if self.shuffle_rows > 1 else None,
            local_shuffle_seed=_seed_int(self.seed, zlib.crc32(self.name.encode()), self.exec_epoch, self.rank),
            drop_last=False)
        self._it = iter(gen)

    def _stalled(self) -> None:
        assert self.on_stall is not None
        self.on_stall(
            f"source '{self.name}': no rows from Ray Data for {self.stall_s:.0f} s (worker {self.rank}). If Ray "
            "Data's log (logs/ray-data/ in the Ray session) says \"Cluster resources are not enough to run any task\", "
            "its read tasks (data.ray_data_read_cpus CPUs each) find no CPU beside the training workers "
            "(train.cpus_per_worker each) and training waits for good: leave a CPU or more of the cluster free of "
            "training workers, lower data.ray_data_read_cpus, or use data.loader stream")

    def _pull(self) -> Arrays | None:
        assert self._it is not None
        self.waiting_since = time.monotonic()
        try:
            b = next(self._it)
        except StopIteration:
            return None
        finally:
            self.waiting_since = None
        arrays = tuple(np.stack(list(b[c])) if b[c].dtype == object else np.asarray(b[c]) for c in _COLUMNS)
        arrays = tuple(a.astype(np.int32, copy=False) for a in arrays)
        return self.transform(arrays) if self.transform is not None else arrays  # type: ignore[return-value]

    def _refill(self) -> None:
        """Fill the (empty) buffer with the next batch of the current execution, or start the next one."""
        if self._it is None:  # first read, or the first after a resume: skip what the checkpoint handed out
            self._open()
            skip = self._skip
            while skip > 0:
                got = self._pull()
                if got is None:
                    raise InputError(f"source '{self.name}': the checkpoint handed out {self._skip} rows of epoch "
                                     f"{self.exec_epoch}, the data now has fewer; resume with the same prepared "
                                     "data and train.num_workers")
                n = len(got[0])
                if n > skip:
                    self._buf = tuple(a[skip:] for a in got)  # type: ignore[assignment]
                skip -= min(n, skip)
            self._skip = 0
            if self._buf is not None:
                return
        got = self._pull()
        if got is None:  # this execution is done: the next one, in a new seeded order
            self.exec_epoch += 1
            self.rows = 0
            self._open()
            got = self._pull()
            if got is None:
                raise InputError(f"dataset '{self.name}' gave worker {self.rank} no rows: it has fewer rows than "
                                 f"the {self.world} workers")
        self._buf = got

    def next(self) -> Batch:
        parts: list[Arrays] = []
        need = self.batch_size
        while need > 0:
            if self._buf is None or len(self._buf[0]) == 0:
                self._buf = None
                self._refill()
            assert self._buf is not None
            take = min(need, len(self._buf[0]))
            parts.append(tuple(a[:take] for a in self._buf))  # type: ignore[arg-type]
            self._buf = tuple(a[take:] for a in self._buf)  # type: ignore[assignment]
            self.rows += take
            need -= take
        ids, pos, lab = (np.concatenate([p[k] for p in parts]) for k in range(3))
        self.cursor += 1
        return to_batch(PackedRows(self.name, ids, pos, lab), np.arange(self.batch_size), self.device)

    # ----------------------------------------------------------------- state
    @property
    def epoch(self) -> float:
        """Passes over the source so far (this rank's share of one pass is ``source_rows // world`` rows)."""
        return self.cursor * self.batch_size / self.per_rank_pass

    def state_dict(self) -> dict[str, Any]:
        return {"loader": LOADER, "cursor": self.cursor, "epoch": self.exec_epoch, "rows": self.rows,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("loader") != LOADER:
            raise InputError(f"source '{self.name}': the checkpoint's data position was written by the "
                             f"{state.get('loader', 'stream or memory')} loader; resume with that data.loader")
        bs = int(state.get("batch_size", self.batch_size))
        if bs != self.batch_size:
            raise InputError(f"source '{self.name}': the checkpoint's position counts batches of {bs} rows, "
                             f"this run uses {self.batch_size}; resume with the same micro-batch size "
                             "(the stage's micro_batch_size or train.micro_batch_size)")
        self.close()
        self.cursor, self.exec_epoch, self.rows = int(state["cursor"]), int(state["epoch"]), int(state["rows"])
        self._skip, self._buf = self.rows, None

    def close(self) -> None:
        """End the current execution's iterator (Ray's split coordinator is told this split stopped reading)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()
