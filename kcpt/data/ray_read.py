"""Raw documents as a Ray Dataset: many read tasks per big file, every record with its file and line.

Why a ``ray.data.Datasource`` of kcpt's own and not ``ray.data.read_json`` / ``read_text`` (checked on Ray 2.60):
both read a file in ONE task (a larger ``override_num_blocks`` only splits that task's output, shown as
``->SplitBlocks(k)``), so a 50 GB JSONL file is still read by one core; ``read_json`` (pyarrow's JSON reader)
fails the whole file on one malformed line; ``read_text`` decodes a file at once (one invalid UTF-8 byte fails
it), drops empty lines and splits on Unicode line separators that JSON allows inside strings; neither keeps line
numbers. kcpt's rule — a bad record is a counted reject naming ``file: line N: field`` — cannot be kept with them.

:class:`InputSource`'s read tasks (:class:`ReadUnit`) are:

- ``.jsonl``: byte ranges of ``block_bytes`` (default ``DataContext.target_max_block_size``); each task reads
  the lines that start in its range (:class:`kcpt.data.sources.LineRange`) with the in-process parser;
- ``.parquet``: ranges of row groups of about ``block_bytes`` (rows numbered from the footer's counts);
- ``.txt`` and HF ``save_to_disk`` dirs: one task per file (a ``.txt`` document may span the whole file).

Line numbers: the first line of a range is numbered 2 + the newlines before its first byte; the driver gets
those counts from one Ray task per range (:func:`count_newlines`: bytes only, no decoding) before the read, so
every record, reject and duplicate names its absolute line. Files at URIs (``s3://…``) are listed on the driver
and read by the tasks through pyarrow.fs (:func:`kcpt.data.sources.open_binary`); nothing goes through the
driver. Each document carries ``order`` = file index × 2⁴⁰ + line (JSONL), row (Parquet) or position (others):
the input order the in-process reader yields, used to keep the first copy on dedup.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from kcpt import storage
from kcpt.data.rejects import RejectReport
from kcpt.data.sources import (
    FILE_EXTENSIONS,
    SUPPORTED,
    LineRange,
    iter_input_files,
    open_binary,
    open_parquet,
    read_documents,
    read_jsonl,
    read_parquet,
    read_txt,
)
from kcpt.errors import InputError

ORDER_STRIDE = 1 << 40
"""``order`` = file index × ORDER_STRIDE + the record's line/row/position in its file."""
READ_BATCH = 512
"""Documents per block yielded by a read task."""
DOC_SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string()), ("doc_id", pa.string()),
                        ("line", pa.int64()), ("order", pa.int64())])


@dataclass(frozen=True)
class ReadUnit:
    """One read task: ``path`` (local path or URI; the ``source`` of its documents), the file's ``index`` in input
    order, its ``fmt`` (jsonl/parquet/txt/hf), and the part of it to read."""

    path: str
    index: int
    fmt: str
    size: int
    span: LineRange = LineRange()
    row_groups: tuple[int, ...] | None = None
    first_row: int = 1


# --------------------------------------------------------------------------- planning (driver)


def _uri_files(uri: str, report: RejectReport) -> list[tuple[str, int]]:
    """``(uri, size)`` of an object, or of the supported files under a prefix (sorted like a directory walk;
    hidden names skipped; other files noted ``skipped_file``)."""
    store, rel = storage.store_and_rel(uri)
    if store.is_file(rel):
        if Path(rel).suffix.lower() not in FILE_EXTENSIONS:
            raise InputError(f"unsupported file extension '{Path(rel).suffix or '(none)'}'; supported: {SUPPORTED}",
                             path=uri)
        return [(uri, int(store.info(rel).size))]
    out = []
    for name, size in sorted(store.walk(rel).items(), key=lambda kv: kv[0].split("/")):
        if any(part.startswith(".") for part in name.split("/")):
            continue
        if Path(name).suffix.lower() in FILE_EXTENSIONS:
            out.append((storage.join(uri, name), size))
        else:
            report.note("skipped_file", f"{storage.join(uri, name)}: skipped (extension '{Path(name).suffix}' is "
                        f"not one of {SUPPORTED})")
    if not out:
        if not store.walk(rel):
            raise InputError("input URI does not exist (no object or prefix there)", path=uri)
        report.note("empty_directory", f"{uri}: no readable inputs found ({SUPPORTED})")
    return out


def expand_inputs(inputs: list[str | Path], report: RejectReport) -> list[tuple[str, int]]:
    """The files to read, in the in-process reader's order, as ``(path or URI, size in bytes)``; an HF
    ``save_to_disk`` directory counts as one file (size 0)."""
    local = [p for p in inputs if not storage.is_uri(str(p))]
    if len(local) == len(inputs):
        files = iter_input_files(local, report=report)
        return [(str(f), 0 if f.is_dir() else f.stat().st_size) for f in files]
    out: list[tuple[str, int]] = []
    for inp in inputs:
        got = (_uri_files(str(inp), report) if storage.is_uri(str(inp)) else
               [(str(f), 0 if f.is_dir() else f.stat().st_size) for f in iter_input_files([inp], report=report)])
        out += [g for g in got if g[0] not in {o[0] for o in out}]
    return out


@ray.remote(num_cpus=1)
def count_newlines(path: str, lo: int, hi: int) -> int:
    """Newlines in bytes ``[lo, hi)`` of ``path`` (local or URI), read in 8 MiB chunks."""
    n = 0
    with open_binary(path) as f:
        f.seek(lo)
        left = hi - lo
        while left > 0 and (chunk := f.read(min(left, 8 << 20))):
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def _jsonl_units(path: str, index: int, size: int, block_bytes: int) -> list[ReadUnit]:
    starts = list(range(0, size, block_bytes)) or [0]
    if len(starts) == 1:
        return [ReadUnit(path, index, "jsonl", size)]
    bounds = [max(s - 1, 0) for s in starts]  # count in [s_j - 1, s_{j+1} - 1): they tile [0, s_k - 1)
    counts = ray.get([count_newlines.remote(path, lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)])
    units, before = [], 0
    for k, s in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else None
        units.append(ReadUnit(path, index, "jsonl", (end or size) - s, LineRange(s, end, 1 if k == 0 else 2 + before)))
        if k < len(counts):
            before += counts[k]
    return units


def _parquet_units(path: str, index: int, text_field: str, block_bytes: int) -> list[ReadUnit]:
    pf = open_parquet(path, text_field)  # checks the column on the driver (footer only)
    try:
        md = pf.metadata
        units, groups, size, first, row = [], [], 0, 1, 1
        for g in range(md.num_row_groups):
            groups.append(g)
            size += md.row_group(g).total_byte_size
            row += md.row_group(g).num_rows
            if size >= block_bytes or g == md.num_row_groups - 1:
                units.append(ReadUnit(path, index, "parquet", size, row_groups=tuple(groups), first_row=first))
                groups, size, first = [], 0, row
        return units or [ReadUnit(path, index, "parquet", 0, row_groups=(), first_row=1)]
    finally:
        pf.close()


def plan_units(files: list[tuple[str, int]], *, text_field: str, block_bytes: int) -> list[ReadUnit]:
    """The read tasks for ``files`` (see the module docstring); counts JSONL newlines with Ray tasks."""
    units: list[ReadUnit] = []
    for i, (path, size) in enumerate(files):
        suffix = Path(path).suffix.lower()
        if suffix == ".jsonl":
            units += _jsonl_units(path, i, size, block_bytes)
        elif suffix == ".parquet" and not (not storage.is_uri(path) and os.path.isdir(path)):
            units += _parquet_units(path, i, text_field, block_bytes)
        else:
            units.append(ReadUnit(path, i, "txt" if suffix == ".txt" else "hf", size))
    return units


def default_block_bytes() -> int:
    """``DataContext.target_max_block_size`` (128 MiB by default), the byte size of one read task."""
    return int(ray.data.DataContext.get_current().target_max_block_size or 128 << 20)


# --------------------------------------------------------------------------- reading (in Ray tasks)


def _documents(unit: ReadUnit, *, report: RejectReport, text_field: str, strict: bool, max_line_chars: int,
               txt_split: str, crlf: list[int]) -> Iterator[tuple[Any, int]]:
    """``(document, ordinal)`` of one unit."""
    if unit.fmt == "jsonl":
        docs = read_jsonl(unit.path, text_field=text_field, report=report, strict=strict,
                          max_line_chars=max_line_chars, span=unit.span, on_crlf=lambda n: crlf.append(n))
        return ((d, d.meta["line"]) for d in docs)
    if unit.fmt == "parquet":
        docs = read_parquet(unit.path, text_field=text_field, report=report, strict=strict,
                            row_groups=list(unit.row_groups or ()), first_row=unit.first_row)
        return ((d, d.meta["row"]) for d in docs)
    if unit.fmt == "txt":
        docs = read_txt(unit.path, report=report, strict=strict, max_line_chars=max_line_chars, txt_split=txt_split)
    else:
        docs = read_documents([unit.path], text_field=text_field, report=report, strict=strict,
                              max_line_chars=max_line_chars, txt_split=txt_split)
    return ((d, k) for k, d in enumerate(docs, 1))


def _block(rows: list[tuple[Any, int]], index: int) -> pa.Table:
    return pa.Table.from_pydict({
        "text": [d.text for d, _ in rows], "source": [d.source for d, _ in rows],
        "doc_id": [d.doc_id for d, _ in rows],
        "line": [d.meta.get("line") or 0 for d, _ in rows],  # a Parquet/HF row is no line (as in-process)
        "order": [index * ORDER_STRIDE + k for _, k in rows]}, schema=DOC_SCHEMA)


def read_unit(unit: ReadUnit, *, state, text_field: str, strict: bool, max_line_chars: int,
              txt_split: str) -> Iterator[pa.Table]:
    """Blocks of up to :data:`READ_BATCH` documents (:data:`DOC_SCHEMA`); the unit's rejects go to ``state``."""
    report = RejectReport()
    crlf: list[int] = []
    buf: list[tuple[Any, int]] = []
    for item in _documents(unit, report=report, text_field=text_field, strict=strict,
                           max_line_chars=max_line_chars, txt_split=txt_split, crlf=crlf):
        buf.append(item)
        if len(buf) == READ_BATCH:
            yield _block(buf, unit.index)
            buf = []
    if buf:
        yield _block(buf, unit.index)
    if crlf:  # once per file, as in-process: the actor keeps the smallest line over the file's ranges
        state.note_once.remote("crlf_normalised", unit.path, min(crlf), "CRLF line endings normalised to LF")
    ray.get([state.merge.remote(report, {}), state.bump.remote("read_tasks")])


class InputSource(Datasource):
    """A Ray Data source over planned :class:`ReadUnit` s (one read task each)."""

    def __init__(self, units: list[ReadUnit], **read_kwargs: Any) -> None:
        super().__init__()
        self.units = units
        self.read_kwargs = read_kwargs

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(u.size for u in self.units) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [ReadTask(functools.partial(read_unit, u, **self.read_kwargs),
                         BlockMetadata(num_rows=None, size_bytes=u.size or None, exec_stats=None,
                                       input_files=[u.path]), schema=DOC_SCHEMA)
                for u in self.units]


# --------------------------------------------------------------------------- content hashes of URI inputs


@ray.remote(num_cpus=1)
def _sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open_binary(path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def uri_input_sha256(uri: str, files: list[str]) -> str:
    """:func:`kcpt.data.sources.input_sha256` of a URI input (an object, or a prefix holding ``files``), hashed by
    Ray tasks reading the objects (not the driver)."""
    if files == [uri]:
        return ray.get(_sha256_of.remote(uri))
    digests = ray.get([_sha256_of.remote(f) for f in files])
    h = hashlib.sha256()
    for f, d in zip(files, digests, strict=True):
        h.update(f[len(uri.rstrip("/")) + 1:].encode())
        h.update(b"\0")
        h.update(d.encode())
    return h.hexdigest()
