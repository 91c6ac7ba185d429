"""The prepare pipeline on Ray Data, for corpora larger than one machine; and reading prepared shards.

Same parsing, cleaning, tokenizing and packing code as the in-process path (:mod:`kcpt.data.prepare`), streamed
through Ray Data (raw):

1. read: :class:`kcpt.data.ray_read.InputSource` — one read task per byte range of a JSONL file, per row-group
   range of a Parquet file, per ``.txt`` file / HF dir (so one big file is many read tasks; ``block_bytes``,
   default ``DataContext.target_max_block_size``); every record keeps its file and absolute line, so a bad one
   is a counted reject naming ``file: line N: field`` as in-process; inputs at URIs are read by the tasks;
2. ``map_batches(_clean_offer)``: normalise/filter (counted rejects); with ``filters.dedup`` each document's
   digest is offered, with its input order, to one of ``dedup_shards`` :class:`DedupShard` actors (chosen by
   digest prefix), which keeps the smallest order per digest; the cleaned documents are then materialised (in the
   object store, spilled to disk when large): the one barrier, so the winner of every digest is known;
3. ``map_batches(_keep_first)``: a document whose order is not its digest's smallest is a ``duplicate`` naming
   the kept one. Dedup is therefore exact and deterministic: the copy kept is the first in input order (file
   order, then line/row), the one the in-process path keeps, whatever the task order. No actor holds every hash:
   each shard holds ~1/N of them (about 150 bytes per unique document);
4. ``map_batches(Tokenize)`` in an actor pool (``compute=ActorPoolStrategy(size=actors)``): the tokenizer is
   deserialised once per actor, not per batch; tokenize + EOS + chunk → one row per segment;
5. ``map_batches(_pack, batch_size=window)``: best-fit decreasing per window of segments → packed rows;
6. ``write_parquet`` straight to the destination: a local ``out_dir`` is written in its temporary sibling and
   renamed at the end (shards renamed ``part-NNNNN.parquet``); a URI ``out_dir`` (``s3://…``) gets the shards
   written there by the tasks, then the tokenizer, then ``manifest.json`` last (:mod:`kcpt.storage`'s rule: a
   reader that finds the manifest finds every shard; an old dataset there is retracted manifest first, and a
   failed run removes what it wrote).

Exam datasets: one read task per file (items are validated in order per file); ids are claimed at the same
sharded actors, first claimant keeps it (``duplicate_id``; which file keeps a repeated id depends on task order,
the counts do not); items are encoded in the ``Tokenize`` actor pool.

Counters (rejects, kept documents per file, pack stats, read tasks, tokenizer actors) live in one small actor
(:class:`PipelineState`) and end up in the manifest (``ray_data``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FilenameProvider

from kcpt import storage
from kcpt.config import DatasetConfig, KcptConfig
from kcpt.data.packing import (
    DEFAULT_WINDOW,
    NewTokenOversampler,
    PackStats,
    Segment,
    pack_window,
    tokenize_documents,
)
from kcpt.data.prepare import TOKENIZE_BATCH, batched, encode_counting, manifest_extra, new_token_oversampler
from kcpt.data.rejects import RejectReport, reject
from kcpt.data.shards import (
    MANIFEST,
    PREPARED_FORMAT,
    atomic_dir,
    check_output_dir,
    finish_prepared,
    input_entries,
    read_manifest,
    rows_to_table,
    shard_name,
)
from kcpt.data.types import Document, ExamItem
from kcpt.errors import InputError, KcptError
from kcpt.hashing import sha256_bytes

DEDUP_SHARDS = 4
"""Dedup actors (each holds the digests whose prefix maps to it)."""


@ray.remote(num_cpus=0)
class PipelineState:
    """One actor per pipeline run: reject/kept counters, pack stats and run counters, updated by the pipeline's
    tasks and read by the driver at the end."""

    def __init__(self) -> None:
        self.report = RejectReport()
        self.kept: Counter[str] = Counter()
        self.stats: PackStats | None = None
        self.counters: Counter[str] = Counter()
        self.once: dict[tuple[str, str], tuple[int, str]] = {}
        self.items: list[Any] = []

    def add_items(self, items: list[Any]) -> None:
        """Exam items kept by one encode batch (the driver writes them as ``items.jsonl``, in input order)."""
        self.items.extend(items)

    def kept_items(self) -> list[Any]:
        return self.items

    def merge(self, report: RejectReport, kept: dict[str, int]) -> None:
        self.report.merge(report)
        self.kept.update(kept)

    def bump(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    def note_once(self, kind: str, path: str, line: int, message: str) -> None:
        """A notice counted once per file (over all its read tasks), with its smallest line."""
        old = self.once.get((kind, path))
        if old is None or line < old[0]:
            self.once[(kind, path)] = (line, message)

    def add_stats(self, stats: PackStats) -> None:
        if self.stats is None:
            self.stats = stats
        else:
            self.stats.merge(stats)

    def result(self) -> tuple[RejectReport, dict[str, int], PackStats | None, dict[str, int]]:
        for (kind, path), (line, message) in sorted(self.once.items(), key=lambda kv: (kv[0], kv[1][0])):
            self.report.note(kind, f"{path}: line {line}: {message}")
        self.once.clear()
        return self.report, dict(self.kept), self.stats, dict(self.counters)


@ray.remote(num_cpus=0)
class DedupShard:
    """The digests whose prefix maps to this shard: for each, the smallest input order offered and its label
    (documents), or the first label claimed (exam ids)."""

    def __init__(self) -> None:
        self.best: dict[bytes, tuple[int, str]] = {}

    def offer(self, keys: list[bytes], orders: list[int], labels: list[str]) -> None:
        for k, o, lab in zip(keys, orders, labels, strict=True):
            old = self.best.get(k)
            if old is None or o < old[0]:
                self.best[k] = (o, lab)

    def winners(self, keys: list[bytes]) -> list[tuple[int, str]]:
        return [self.best[k] for k in keys]

    def size(self) -> int:
        return len(self.best)

    def claim(self, keys: list[bytes], labels: list[str]) -> list[str | None]:
        """For each key: None if it is the first claim (kept), else the label given with the first claim."""
        out: list[str | None] = []
        for k, lab in zip(keys, labels, strict=True):
            first = self.best.get(k)
            if first is None:
                self.best[k] = (0, lab)
            out.append(None if first is None else first[1])
        return out


def _by_shard(hex_digests: list[str], n: int) -> dict[int, list[int]]:
    """Positions of ``hex_digests`` grouped by their shard (the first 8 hex digits modulo ``n``)."""
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(hex_digests):
        groups.setdefault(int(d[:8], 16) % n, []).append(i)
    return groups


def _key(hex_digest: str) -> bytes:
    return bytes.fromhex(hex_digest)[:16]


# --------------------------------------------------------------------------- UDFs (run in Ray tasks / actors)


def _docs_of(batch: dict[str, np.ndarray]) -> list[Document]:
    return [Document(text=str(t), source=str(s), doc_id=str(i), meta={"line": int(ln)} if ln else {})
            for t, s, i, ln in zip(batch["text"], batch["source"], batch["doc_id"], batch["line"], strict=True)]


def _clean_offer(batch: dict[str, np.ndarray], *, state, shards: list, cfg: KcptConfig) -> dict[str, Any]:
    """Normalise + filter a batch of documents; offer each kept digest (with its input order) to its shard."""
    from kcpt.data.cleaning import clean_documents

    filters = cfg.data.filters
    report = RejectReport()
    orders = {str(i): int(o) for i, o in zip(batch["doc_id"], batch["order"], strict=True)}
    cleaned = list(clean_documents(_docs_of(batch), filters.model_copy(update={"dedup": False}), report,
                                   strict=cfg.data.strict))
    digests = [d.meta["sha256"] for d in cleaned]
    if filters.dedup:
        ray.get([shards[s].offer.remote([_key(digests[i]) for i in idx], [orders[cleaned[i].doc_id] for i in idx],
                                        [cleaned[i].doc_id for i in idx])
                 for s, idx in _by_shard(digests, len(shards)).items()])
    ray.get(state.merge.remote(report, {} if filters.dedup else Counter(d.source for d in cleaned)))
    return {"text": [d.text for d in cleaned], "source": [d.source for d in cleaned],
            "doc_id": [d.doc_id for d in cleaned], "line": [d.meta.get("line") or 0 for d in cleaned],
            "order": [orders[d.doc_id] for d in cleaned], "sha256": digests}


def _keep_first(batch: dict[str, np.ndarray], *, state, shards: list, strict: bool) -> dict[str, Any]:
    """Keep the documents that are their digest's smallest order; the others are ``duplicate`` rejects."""
    digests = [str(d) for d in batch["sha256"]]
    won: list[tuple[int, str] | None] = [None] * len(digests)
    groups = _by_shard(digests, len(shards))
    answers = ray.get([shards[s].winners.remote([_key(digests[i]) for i in idx]) for s, idx in groups.items()])
    for idx, ans in zip(groups.values(), answers, strict=True):
        for i, w in zip(idx, ans, strict=True):
            won[i] = w
    report = RejectReport()
    keep = []
    for i, w in enumerate(won):
        assert w is not None
        if w[0] == int(batch["order"][i]):
            keep.append(i)
        else:
            reject(report, "duplicate", f"document {batch['doc_id'][i]}: same text as {w[1]}", strict=strict,
                   path=str(batch["source"][i]), line=int(batch["line"][i]) or None)
    ray.get(state.merge.remote(report, Counter(str(batch["source"][i]) for i in keep)))
    return {"text": [batch["text"][i] for i in keep]}


def _segments_batch(segs: list[Segment]) -> dict[str, Any]:
    return {"input_ids": [np.asarray(s.input_ids, np.int32) for s in segs],
            "labels": [np.asarray(s.labels, np.int32) for s in segs], "source": [s.source for s in segs],
            "splittable": [s.splittable for s in segs]}


class Tokenize:
    """Actor-pool UDF: the tokenizer arrives once per actor (constructor), then serves every batch it gets.
    Raw batches (``text``) are tokenized + EOS + chunked; exam batches (``item``: JSON) are rendered + encoded."""

    def __init__(self, tokenizer, cfg: KcptConfig, name: str, state,
                 oversampler: NewTokenOversampler | None = None) -> None:
        self.tokenizer, self.cfg, self.name, self.state = tokenizer, cfg, name, state
        self.oversampler = oversampler
        state.bump.remote("tokenizer_actors")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        self.state.bump.remote("tokenize_batches")
        if "text" in batch:
            before = self.oversampler.documents if self.oversampler is not None else 0
            segs = tokenize_documents([str(t) for t in batch["text"]], self.tokenizer, self.cfg.data.seq_len,
                                      self.name, copies=self.oversampler)
            if self.oversampler is not None and self.oversampler.documents > before:
                self.state.bump.remote("oversampled_new_tokens", self.oversampler.documents - before)
            return _segments_batch(segs)
        report, kept, kept_items = RejectReport(), Counter(), []
        items = [ExamItem(**json.loads(str(j))) for j in batch["item"]]
        segs = list(encode_counting(items, self.tokenizer, self.cfg, report, self.name, kept, kept_items))
        ray.get([self.state.merge.remote(report, dict(kept)), self.state.add_items.remote(kept_items)])
        return _segments_batch(segs)


def _read_exam(batch: dict[str, np.ndarray], *, state, shards: list, cfg: KcptConfig,
               exam_kind: str | None) -> Iterator[dict]:
    """Read one exam file per task; claim item ids at the shards (``duplicate_id`` across files, first claimant
    keeps it); keep only ``exam_kind`` (after the check, as in-process). Yields items as JSON."""
    from kcpt.data.exam_io import read_exam_items

    data = cfg.data
    for path in batch["path"]:
        report = RejectReport()
        items = read_exam_items([str(path)], report=report, strict=data.strict,
                                max_line_chars=data.filters.max_line_chars)
        for chunk in batched(items, TOKENIZE_BATCH):
            digests = [sha256_bytes(i.id.encode("utf-8")) for i in chunk]
            firsts: list[str | None] = [None] * len(chunk)
            groups = _by_shard(digests, len(shards))
            answers = ray.get([shards[s].claim.remote([_key(digests[i]) for i in idx],
                                                      [f"{chunk[i].source}: line {chunk[i].line}" for i in idx])
                               for s, idx in groups.items()])
            for idx, ans in zip(groups.values(), answers, strict=True):
                for i, a in zip(idx, ans, strict=True):
                    firsts[i] = a
            out = []
            for item, first in zip(chunk, firsts, strict=True):
                if first is not None:
                    reject(report, "duplicate_id", f"id {item.id!r} already used at {first}", strict=data.strict,
                           path=item.source, line=item.line, field="id")
                elif exam_kind is None or item.kind == exam_kind:
                    out.append(json.dumps(item.__dict__, ensure_ascii=False))
                else:
                    report.note("other_kind", f"{item.source}: line {item.line}: kind {item.kind!r} skipped "
                                f"(keeping only {exam_kind!r})")
            if out:
                yield {"item": out}
        ray.get([state.merge.remote(report, {}), state.bump.remote("read_tasks")])


def _pack(batch: dict[str, np.ndarray], *, state, seq_len: int, pad_id: int) -> pa.Table:
    segs = [Segment(ids, labels, str(src), bool(cut)) for ids, labels, src, cut
            in zip(batch["input_ids"], batch["labels"], batch["source"], batch["splittable"], strict=True)]
    rows = pack_window(segs, seq_len, pad_id) if segs else []
    stats = PackStats(seq_len)
    for r in rows:
        stats.add_row(r)
    ray.get(state.add_stats.remote(stats))
    return rows_to_table(rows)


# --------------------------------------------------------------------------- driver


def _kcpt_cause(err: BaseException) -> KcptError | None:
    """The KcptError (e.g. an InputError raised in strict mode) inside Ray's wrapped task errors, if any."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KcptError) and not isinstance(e, ray.exceptions.RayError):
            if e.args and isinstance(e.args[0], str):  # drop the retry advice Ray Data appends to the message
                e.args = (e.args[0].split("\nFailed to ", 1)[0], *e.args[1:])
            return e
        stack += [e.__context__, e.__cause__, getattr(e, "cause", None)]  # popped last first: Ray's cause
    return None


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data logs a task's exception with its traceback before raising it; we re-raise it ourselves (a
    KcptError as a one-line message), so its error logs are muted while the pipeline runs."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *, verbose: bool = False) -> bool:
    """Join ``address`` / ``RAY_ADDRESS`` or start a local Ray with ``num_cpus`` (default: this machine's CPU
    count), unless Ray is up already (:func:`kcpt.raystart.start_ray`; ``verbose``: Ray's output on the console).
    True if this call started it."""
    from kcpt.raystart import start_ray

    return start_ray(address, num_cpus=num_cpus or os.cpu_count() or 1, verbose=verbose, dashboard=False)  # no Train


def prepare_dataset_ray(name: str, ds: DatasetConfig, cfg: KcptConfig, out_dir: str | Path, tokenizer, *,
                        overwrite: bool = False, extra: dict[str, Any] | None = None,
                        window: int = DEFAULT_WINDOW, progress: bool = True,
                        input_sha256s: list[str] | None = None, address: str | None = None,
                        block_bytes: int | None = None, actors: int | None = None,
                        dedup_shards: int = DEDUP_SHARDS) -> str | Path:
    """Ray Data version of :func:`kcpt.data.prepare.prepare_dataset` (same manifest counts; rows may be grouped
    differently because packing runs per window of each block). ``out_dir``: a local directory or a URI (written
    there directly; returned as given). ``progress``: Ray Data's progress bars. ``address``: the Ray to join
    (default ``RAY_ADDRESS``, else a local Ray started and stopped here). ``block_bytes``: bytes per read task
    (default ``DataContext.target_max_block_size``); ``actors``: tokenizer actors (default: the cluster's CPUs
    minus one, at least one); ``dedup_shards``: dedup actors."""
    started = ensure_ray(address, verbose=cfg.logging.verbose)
    try:
        return _run_pipeline(name, ds, cfg, out_dir, tokenizer, overwrite=overwrite, extra=extra, window=window,
                             progress=progress, input_sha256s=input_sha256s, block_bytes=block_bytes,
                             actors=actors, dedup_shards=dedup_shards)
    finally:
        if started:
            ray.shutdown()


def _inputs(ds: DatasetConfig) -> list[str | Path]:
    """Config inputs: ``demo:`` splits and local paths resolved, URIs kept (read by the tasks)."""
    from kcpt.data.demo import resolve_inputs

    return [inp if storage.is_uri(inp) else resolve_inputs([inp])[0] for inp in ds.inputs]


def _rows(name: str, ds: DatasetConfig, cfg: KcptConfig, tokenizer, paths: list[str | Path], *, state, shards,
          driver_report: RejectReport, window: int, block_bytes: int | None, actors: int, actor_cpus: float
          ) -> tuple[ray.data.Dataset, list[tuple[str, int]]]:
    """The dataset of packed rows (lazy) and the files it reads. ``actor_cpus``: CPUs per tokenizer actor (the pool
    leaves one CPU to the tasks that feed it: on a one-CPU cluster its actors reserve none)."""
    from kcpt.data.ray_read import InputSource, default_block_bytes, expand_inputs, plan_units
    from kcpt.model.tokenizer import pad_token_id

    data = cfg.data
    files = expand_inputs(paths, driver_report)
    tok_args = {"fn_constructor_kwargs": {"tokenizer": tokenizer, "cfg": cfg, "name": name, "state": state,
                                          "oversampler": new_token_oversampler(name, ds, cfg)},
                "compute": ray.data.ActorPoolStrategy(size=actors), "num_cpus": actor_cpus,
                "batch_size": TOKENIZE_BATCH}
    if ds.kind == "raw":
        units = plan_units(files, text_field=ds.text_field, block_bytes=block_bytes or default_block_bytes())
        docs = ray.data.read_datasource(InputSource(units, state=state, text_field=ds.text_field,
                                                    strict=data.strict, max_line_chars=data.filters.max_line_chars,
                                                    txt_split=data.txt_split), override_num_blocks=len(units))
        texts = docs.map_batches(_clean_offer, batch_size=TOKENIZE_BATCH, fn_kwargs={
            "state": state, "shards": shards, "cfg": cfg})
        if data.filters.dedup:  # the barrier: every digest's first copy is known before any is kept
            with _task_errors():
                texts = texts.materialize()
            texts = texts.map_batches(_keep_first, batch_size=TOKENIZE_BATCH, fn_kwargs={
                "state": state, "shards": shards, "strict": data.strict})
        segments = texts.map_batches(Tokenize, **tok_args)
    else:
        from kcpt.data.exam_io import is_exam_file

        files = [(f, n) for f, n in files if is_exam_file(f, paths, driver_report)]
        files_ds = ray.data.from_items([{"path": f} for f, _ in files], override_num_blocks=max(1, len(files)))
        items = files_ds.map_batches(_read_exam, batch_size=1, fn_kwargs={
            "state": state, "shards": shards, "cfg": cfg, "exam_kind": ds.exam_kind})
        segments = items.map_batches(Tokenize, **tok_args)
    rows = segments.map_batches(_pack, batch_size=window, batch_format="numpy", fn_kwargs={
        "state": state, "seq_len": data.seq_len, "pad_id": pad_token_id(tokenizer)})
    return rows, files


@contextmanager
def _task_errors() -> Iterator[None]:
    """Run Ray Data execution, surfacing a user-facing error raised inside a task as itself (one line)."""
    try:
        with _quiet_ray_data():
            yield
    except Exception as e:
        cause = _kcpt_cause(e)
        if cause is not None:
            raise cause from None
        raise


def _write(rows: ray.data.Dataset, target: str, run: str) -> None:
    """``write_parquet`` to a local directory or URI, files named ``part-<run>_<write uuid>_<task>.parquet`` (this
    run's shards, told apart from any other file at the target)."""
    names = FilenameProvider(f"part-{run}", "parquet")
    with _task_errors():
        if storage.is_uri(target):
            import pyarrow.fs as pafs

            fs, key = pafs.FileSystem.from_uri(target)
            rows.write_parquet(key, filesystem=fs, filename_provider=names)
        else:
            rows.write_parquet(target, filename_provider=names)


def _run_pipeline(name: str, ds: DatasetConfig, cfg: KcptConfig, out_dir: str | Path, tokenizer, *,
                  overwrite: bool, extra: dict[str, Any] | None, window: int, progress: bool,
                  input_sha256s: list[str] | None, block_bytes: int | None, actors: int | None,
                  dedup_shards: int) -> str | Path:
    ray.data.DataContext.get_current().enable_progress_bars = progress
    paths = _inputs(ds)
    remote = storage.is_uri(str(out_dir))
    if remote:
        _check_uri_out(str(out_dir), overwrite=overwrite)
    else:
        check_output_dir(out_dir, overwrite=overwrite)  # before any work (atomic_dir checks again at the end)
    cpus = float(ray.cluster_resources().get("CPU", 2))
    if actors is None:
        actors = max(1, int(cpus) - 1)
    driver_report = RejectReport()
    state = PipelineState.remote()
    shards = [DedupShard.remote() for _ in range(max(1, dedup_shards))]
    files: list[tuple[str, int]] = []

    def finish(tmp: Path, shard_names: list[str]) -> None:
        report, kept, stats, counters = ray.get(state.result.remote())
        report.merge(driver_report)
        over = new_token_oversampler(name, ds, cfg)
        for _ in range(counters.get("oversampled_new_tokens", 0)):
            report.note("oversampled_new_tokens", f"documents holding new tokens written {over.factor}x")
        run = {"read_tasks": counters.get("read_tasks", 0), "tokenizer_actors": counters.get("tokenizer_actors", 0),
               "tokenize_batches": counters.get("tokenize_batches", 0), "files": len(files),
               "dedup_shard_sizes": ray.get([s.size.remote() for s in shards])}
        items = None
        if ds.kind == "exam":  # in input order, as the in-process path writes them
            order = {str(f): i for i, (f, _) in enumerate(files)}
            items = sorted(ray.get(state.kept_items.remote()),
                           key=lambda it: (order.get(str(it.source), len(order)), it.line or 0))
        finish_prepared(tmp, tokenizer=tokenizer, stats=stats or PackStats(cfg.data.seq_len), kind=ds.kind,
                        inputs=input_entries(paths, kept, input_sha256s or _hashes(paths, files)), report=report,
                        shards=shard_names, extra={**manifest_extra(name, ds, cfg, "ray_data", extra),
                                                   "ray_data": run}, items=items)

    try:
        rows, files[:] = _rows(name, ds, cfg, tokenizer, paths, state=state, shards=shards,
                               driver_report=driver_report, window=window, block_bytes=block_bytes, actors=actors,
                               actor_cpus=max(0.0, min(1.0, (cpus - 1) / actors)))
        if remote:
            _write_uri(rows, str(out_dir), finish)
            return str(out_dir)
        out = Path(out_dir)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            _write(rows, str(tmp / "_ray"), "r")
            written = sorted((tmp / "_ray").glob("*.parquet"))
            names = []
            for i, f in enumerate(written):
                f.rename(tmp / shard_name(i))
                names.append(shard_name(i))
            shutil.rmtree(tmp / "_ray", ignore_errors=True)  # absent when no row was written
            if not names:  # keep the layout valid for an empty dataset
                pq.write_table(rows_to_table([]), tmp / shard_name(0))
                names = [shard_name(0)]
            finish(tmp, names)
        return out
    finally:
        for actor in (state, *shards):
            ray.kill(actor)


def _hashes(paths: list[str | Path], files: list[tuple[str, int]]) -> list[str]:
    """Content hashes of the inputs (:func:`kcpt.data.sources.input_sha256`; URI inputs hashed by Ray tasks)."""
    from kcpt.data.ray_read import uri_input_sha256
    from kcpt.data.sources import input_sha256

    out = []
    for p in paths:
        if storage.is_uri(str(p)):
            pre = str(p).rstrip("/")
            out.append(uri_input_sha256(str(p), [f for f, _ in files if f == str(p) or f.startswith(pre + "/")]))
        else:
            out.append(input_sha256(Path(p)))
    return out


def _check_uri_out(uri: str, *, overwrite: bool) -> None:
    """A URI destination must be empty, or (with ``overwrite``) hold a prepared dataset."""
    storage.check_uri(uri, "--out")
    store, rel = storage.store_and_rel(uri)
    if not store.walk(rel):
        return
    if not overwrite:
        raise InputError("output URI already holds files (remove them or choose another --out)", path=uri)
    try:
        ok = json.loads(store.read_text(f"{rel}/{MANIFEST}")).get("format") == PREPARED_FORMAT
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise InputError(f"holds files and no kcpt {MANIFEST}; --overwrite replaces only a prepared dataset: choose "
                         "another --out or remove them yourself", path=uri)


def _write_uri(rows: ray.data.Dataset, uri: str, finish) -> None:
    """Publish at ``uri`` by the manifest-last rule: retract an old dataset (manifest first), let the tasks
    write the shards there, then upload the tokenizer and ``manifest.json`` last; on failure remove what was
    written, so a reader never finds a manifest without its shards."""
    store, rel = storage.store_and_rel(uri)
    storage.retract_tree(uri, marker=MANIFEST)
    run = uuid.uuid4().hex[:8]
    try:
        _write(rows, uri, run)
        names = sorted(n for n in store.walk(rel) if n.startswith(f"part-{run}_") and n.endswith(".parquet"))
        with tempfile.TemporaryDirectory(prefix="kcpt-prepare-") as tmp:
            if not names:  # keep the layout valid for an empty dataset
                pq.write_table(rows_to_table([]), Path(tmp) / shard_name(0))
                store.upload_file(Path(tmp) / shard_name(0), f"{rel}/{shard_name(0)}")
                (Path(tmp) / shard_name(0)).unlink()
                names = [shard_name(0)]
            finish(Path(tmp), names)
            store.upload_tree(Path(tmp), rel, last=(MANIFEST,))
    except BaseException:
        storage.retract_tree(uri, marker=MANIFEST)
        raise


def read_prepared(directory: str | Path) -> ray.data.Dataset:
    """A prepared dataset's rows as a Ray Dataset (``ray.data.read_parquet`` over its shards; a URI is read in
    place)."""
    from kcpt.data.shards import fetch_prepared

    if storage.is_uri(str(directory)):
        import pyarrow.fs as pafs

        manifest = read_manifest(fetch_prepared(str(directory), shards=False))
        fs, key = pafs.FileSystem.from_uri(str(directory))
        return ray.data.read_parquet([f"{key.rstrip('/')}/{s}" for s in manifest["shards"]], filesystem=fs)
    d = Path(directory)
    manifest = read_manifest(d)
    return ray.data.read_parquet([str(d / s) for s in manifest["shards"]])
