"""The prepare pipeline on Ray Data, for corpora larger than one machine; and reading prepared shards.

Same code as the in-process path (:mod:`kcpt.data.prepare`), streamed through Ray Data:

1. the input files (expanded on the driver) become a dataset of paths, one block per file;
2. ``map_batches(read)``: each task reads its files with :func:`kcpt.data.sources.read_documents` (or
   :func:`kcpt.data.exam_io.read_exam_items`), yielding batches of records (a generator UDF: a file is never
   held whole);
3. ``map_batches(clean + tokenize)`` (raw) or ``map_batches(encode)`` (exam): normalise/filter, exact dedup,
   tokenize + EOS + chunk, or render + answer-only encode; output one row per segment;
4. ``map_batches(pack, batch_size=window)``: best-fit decreasing per window of segments → packed rows;
5. ``write_parquet`` into the dataset's temporary directory; then the driver renames the files to
   ``part-NNNNN.parquet`` and writes the tokenizer and manifest (:mod:`kcpt.data.shards`) and renames the dir.

Nothing is materialised on the driver. Counters (rejects, kept documents per file, pack stats) and the dedup
set live in one small actor (:class:`PipelineState`).

Dedup is exact across blocks: every cleaned document's SHA-256 (of the normalised text) is claimed at the
actor; only the first claimant keeps it. Which copy is kept depends on task order (the text is identical).
Limit: the set lives in one actor (16 bytes of digest + Python overhead, about 100 bytes per unique
document), so about 10⁸ unique documents per GiB-class actor; beyond that shard the set by hash prefix.
Exam item ids are claimed at the same actor, so a duplicate id is caught across files too (``duplicate_id``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from kcpt.config import DatasetConfig, KcptConfig
from kcpt.data.packing import DEFAULT_WINDOW, PackStats, Segment, pack_window, tokenize_documents
from kcpt.data.prepare import TOKENIZE_BATCH, batched, encode_counting, manifest_extra
from kcpt.data.rejects import RejectReport
from kcpt.data.shards import atomic_dir, finish_prepared, input_entries, read_manifest, rows_to_table, shard_name
from kcpt.data.types import Document, ExamItem
from kcpt.errors import KcptError
from kcpt.hashing import sha256_bytes

READ_BATCH = 512
"""Records per batch yielded by the read step."""


@ray.remote(num_cpus=0)
class PipelineState:
    """One actor per pipeline run: reject/kept counters, pack stats, and the claimed set (document digests for
    exact dedup, or exam item ids), updated by the pipeline's tasks and read by the driver at the end."""

    def __init__(self) -> None:
        self.report = RejectReport()
        self.kept: Counter[str] = Counter()
        self.stats: PackStats | None = None
        self.seen: dict[bytes, str] = {}
        self.items: list[Any] = []

    def claim(self, digests: list[str], doc_ids: list[str]) -> list[str | None]:
        """For each hex digest: None if it is the first claim (kept), else the label given with the first claim."""
        out: list[str | None] = []
        for d, i in zip(digests, doc_ids, strict=True):
            key = bytes.fromhex(d)[:16]
            first = self.seen.get(key)
            if first is None:
                self.seen[key] = i
            out.append(first)
        return out

    def merge(self, report: RejectReport, kept: dict[str, int]) -> None:
        self.report.merge(report)
        self.kept.update(kept)

    def add_items(self, items: list[Any]) -> None:
        """Exam items kept by one file's task (the driver writes them as ``items.jsonl``)."""
        self.items.extend(items)

    def kept_items(self) -> list[Any]:
        return self.items

    def add_stats(self, stats: PackStats) -> None:
        if self.stats is None:
            self.stats = stats
        else:
            self.stats.merge(stats)

    def result(self) -> tuple[RejectReport, dict[str, int], PackStats | None]:
        return self.report, dict(self.kept), self.stats


# --------------------------------------------------------------------------- UDFs (run in Ray tasks)


def _read_raw(batch: dict[str, np.ndarray], *, state, text_field: str, strict: bool,
              max_line_chars: int, txt_split: str) -> Iterator[dict[str, list]]:
    from kcpt.data.sources import read_documents

    for path in batch["path"]:
        report = RejectReport()
        docs = read_documents([str(path)], text_field=text_field, report=report, strict=strict,
                              max_line_chars=max_line_chars, txt_split=txt_split)
        for chunk in batched(docs, READ_BATCH):
            yield _docs_batch(chunk)
        ray.get(state.merge.remote(report, {}))


def _docs_batch(docs: list[Document]) -> dict[str, list]:
    return {"text": [d.text for d in docs], "source": [d.source for d in docs], "doc_id": [d.doc_id for d in docs],
            "line": [d.meta.get("line") or d.meta.get("row") or 0 for d in docs]}


def _segments_batch(segs: list[Segment]) -> dict[str, Any]:
    return {"input_ids": [np.asarray(s.input_ids, np.int32) for s in segs],
            "labels": [np.asarray(s.labels, np.int32) for s in segs], "source": [s.source for s in segs],
            "splittable": [s.splittable for s in segs]}


def _clean_tokenize(batch: dict[str, np.ndarray], *, state, cfg: KcptConfig, tokenizer, name: str) -> dict:
    from kcpt.data.cleaning import clean_documents
    from kcpt.data.rejects import reject

    filters = cfg.data.filters
    report = RejectReport()
    docs = [Document(text=str(t), source=str(s), doc_id=str(i), meta={"line": int(ln)} if ln else {})
            for t, s, i, ln in zip(batch["text"], batch["source"], batch["doc_id"], batch["line"], strict=True)]
    cleaned = list(clean_documents(docs, filters.model_copy(update={"dedup": False}), report,
                                   strict=cfg.data.strict))
    if filters.dedup and cleaned:
        firsts = ray.get(state.claim.remote([d.meta["sha256"] for d in cleaned], [d.doc_id for d in cleaned]))
        kept_docs = []
        for d, first in zip(cleaned, firsts, strict=True):
            if first is None:
                kept_docs.append(d)
            else:
                reject(report, "duplicate", f"document {d.doc_id}: same text as {first}", strict=cfg.data.strict,
                       path=d.source, line=d.meta.get("line"))
        cleaned = kept_docs
    ray.get(state.merge.remote(report, Counter(d.source for d in cleaned)))
    return _segments_batch(tokenize_documents([d.text for d in cleaned], tokenizer, cfg.data.seq_len, name))


def _read_encode_exam(batch: dict[str, np.ndarray], *, state, cfg: KcptConfig, tokenizer, name: str,
                      exam_kind: str | None) -> Iterator[dict]:
    from kcpt.data.exam_io import read_exam_items

    data = cfg.data
    for path in batch["path"]:
        report = RejectReport()
        kept: Counter[str] = Counter()
        kept_items: list[ExamItem] = []
        items = read_exam_items([str(path)], report=report, strict=data.strict,
                                max_line_chars=data.filters.max_line_chars)
        items = _claim_ids(items, state=state, report=report, strict=data.strict, kind=exam_kind)
        for chunk in batched(encode_counting(items, tokenizer, cfg, report, name, kept, kept_items), READ_BATCH):
            yield _segments_batch(chunk)
        ray.get(state.merge.remote(report, dict(kept)))
        ray.get(state.add_items.remote(kept_items))


def _claim_ids(items: Iterable[ExamItem], *, state, report: RejectReport, strict: bool,
               kind: str | None) -> Iterator[ExamItem]:
    """Drop items whose id another file already used (``duplicate_id``, as the local path does across files),
    claiming ids at ``state`` per batch; then keep only ``kind`` (after the check, as the local path)."""
    from kcpt.data.rejects import reject

    for chunk in batched(items, READ_BATCH):
        firsts = ray.get(state.claim.remote([sha256_bytes(i.id.encode("utf-8")) for i in chunk],
                                            [f"{i.source}: line {i.line}" for i in chunk]))
        for item, first in zip(chunk, firsts, strict=True):
            if first is not None:
                reject(report, "duplicate_id", f"id {item.id!r} already used at {first}", strict=strict,
                       path=item.source, line=item.line, field="id")
            elif kind is None or item.kind == kind:
                yield item
            else:
                report.note("other_kind", f"{item.source}: line {item.line}: kind {item.kind!r} skipped (keeping "
                            f"only {kind!r})")


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

    return start_ray(address, num_cpus=num_cpus or os.cpu_count() or 1, verbose=verbose)


def prepare_dataset_ray(name: str, ds: DatasetConfig, cfg: KcptConfig, out_dir: str | Path, tokenizer, *,
                        overwrite: bool = False, extra: dict[str, Any] | None = None,
                        window: int = DEFAULT_WINDOW, progress: bool = True,
                        input_sha256s: list[str] | None = None, address: str | None = None) -> Path:
    """Ray Data version of :func:`kcpt.data.prepare.prepare_dataset` (same outputs; rows may be grouped
    differently because packing runs per window of each block). ``progress``: Ray Data's progress bars.
    ``address``: the Ray to join (default ``RAY_ADDRESS``, else a local Ray started and stopped here)."""
    started = ensure_ray(address, verbose=cfg.logging.verbose)
    try:
        return _run_pipeline(name, ds, cfg, out_dir, tokenizer, overwrite=overwrite, extra=extra, window=window,
                             progress=progress, input_sha256s=input_sha256s)
    finally:
        if started:
            ray.shutdown()


def _run_pipeline(name: str, ds: DatasetConfig, cfg: KcptConfig, out_dir: str | Path, tokenizer, *,
                  overwrite: bool, extra: dict[str, Any] | None, window: int, progress: bool,
                  input_sha256s: list[str] | None) -> Path:
    from kcpt.data.demo import resolve_inputs
    from kcpt.data.sources import iter_input_files
    from kcpt.model.tokenizer import pad_token_id

    ray.data.DataContext.get_current().enable_progress_bars = progress
    data = cfg.data
    paths = resolve_inputs(ds.inputs)
    driver_report = RejectReport()
    files = iter_input_files(paths, report=driver_report)
    state = PipelineState.remote()
    files_ds = ray.data.from_items([{"path": str(f)} for f in files], override_num_blocks=max(1, len(files)))
    if ds.kind == "raw":
        docs = files_ds.map_batches(_read_raw, batch_size=1, fn_kwargs={
            "state": state, "text_field": ds.text_field, "strict": data.strict,
            "max_line_chars": data.filters.max_line_chars, "txt_split": data.txt_split})
        segments = docs.map_batches(_clean_tokenize, batch_size=TOKENIZE_BATCH, fn_kwargs={
            "state": state, "cfg": cfg, "tokenizer": tokenizer, "name": name})
    else:
        segments = files_ds.map_batches(_read_encode_exam, batch_size=1, fn_kwargs={
            "state": state, "cfg": cfg, "tokenizer": tokenizer, "name": name, "exam_kind": ds.exam_kind})
    rows = segments.map_batches(_pack, batch_size=window, batch_format="numpy", fn_kwargs={
        "state": state, "seq_len": data.seq_len, "pad_id": pad_token_id(tokenizer)})
    out = Path(out_dir)
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            try:
                with _quiet_ray_data():
                    rows.write_parquet(str(tmp / "_ray"))
            except Exception as e:  # surface the user-facing error raised inside a task
                cause = _kcpt_cause(e)
                if cause is not None:
                    raise cause from None
                raise
            written = sorted((tmp / "_ray").glob("*.parquet"))
            shards = []
            for i, f in enumerate(written):
                f.rename(tmp / shard_name(i))
                shards.append(shard_name(i))
            shutil.rmtree(tmp / "_ray", ignore_errors=True)  # absent when no row was written
            report, kept, stats = ray.get(state.result.remote())
            report.merge(driver_report)
            stats = stats or PackStats(data.seq_len)
            if not shards:  # keep the layout valid for an empty dataset
                pq.write_table(rows_to_table([]), tmp / shard_name(0))
                shards = [shard_name(0)]
            items = None
            if ds.kind == "exam":  # in input order, as the local path writes them
                order = {str(f): i for i, f in enumerate(files)}
                items = sorted(ray.get(state.kept_items.remote()),
                               key=lambda it: (order.get(it.source, len(order)), it.line or 0))
            finish_prepared(tmp, tokenizer=tokenizer, stats=stats, kind=ds.kind,
                            inputs=input_entries(paths, kept, input_sha256s), report=report, shards=shards,
                            extra=manifest_extra(name, ds, cfg, "ray_data", extra), items=items)
    finally:
        ray.kill(state)
    return out


def read_prepared(directory: str | Path) -> ray.data.Dataset:
    """A prepared dataset's rows as a Ray Dataset (``ray.data.read_parquet`` over its shards)."""
    d = Path(directory)
    manifest = read_manifest(d)
    return ray.data.read_parquet([str(d / s) for s in manifest["shards"]])

