"""Prepared datasets on disk: Parquet shards + tokenizer + ``manifest.json``, written atomically.

Layout of a prepared directory ``DIR``::

    DIR/part-00000.parquet ...   rows with ROW_SCHEMA (kcpt.data.types): input_ids, position_ids, labels
                                 (list<int32>, length seq_len each) and source (string)
    DIR/tokenizer/               the tokenizer the ids belong to (save_pretrained)
    DIR/manifest.json            seq_len, rows, tokens (non-pad), pack_efficiency, tokenizer_sha256,
                                 inputs [{path, sha256, documents}], rejects {reason: n}, kind, kcpt_version,
                                 created, shards, ... (see :func:`write_prepared`)

Everything is written into a temporary sibling directory that is renamed to ``DIR`` at the end, so an
interrupted run never leaves a half-written dataset at ``DIR``. :func:`prepared_sha256` (the hash of
``manifest.json``) identifies a prepared dataset; training binds checkpoints to it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kcpt import __version__
from kcpt.data.packing import PackedRow, PackStats
from kcpt.data.types import ROW_SCHEMA
from kcpt.errors import InputError
from kcpt.hashing import sha256_file
from kcpt.model.tokenizer import save_tokenizer, tokenizer_sha256

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_ROWS_PER_SHARD = 8192


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def rows_to_table(rows: list[PackedRow]) -> pa.Table:
    """Rows → a pyarrow Table with :data:`ROW_SCHEMA` (list<int32> columns built from flat arrays, no copies
    per element)."""
    n = len(rows)
    seq_len = len(rows[0].input_ids) if rows else 0
    offsets = pa.array(np.arange(0, (n + 1) * seq_len, seq_len, dtype=np.int32) if n else np.zeros(1, np.int32))

    def column(attr: str) -> pa.Array:
        flat = np.concatenate([getattr(r, attr) for r in rows]) if rows else np.zeros(0, np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(flat.astype(np.int32, copy=False)))

    return pa.Table.from_arrays([column("input_ids"), column("position_ids"), column("labels"),
                                 pa.array([r.source for r in rows], pa.string())], schema=ROW_SCHEMA)


@contextmanager
def atomic_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; on success it replaces ``out_dir`` by rename.

    An existing ``out_dir`` is an error unless ``overwrite``. On an exception the temporary dir is removed.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError("output directory already exists (remove it or choose another --out)", path=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_shards(rows: Iterable[PackedRow], directory: Path, *, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                 stats: PackStats | None = None) -> list[str]:
    """Write rows into ``directory/part-NNNNN.parquet`` files of up to ``rows_per_shard`` rows; returns the
    file names. ``stats`` (optional) is updated per row. At least one (possibly empty) shard is written."""
    names: list[str] = []
    buf: list[PackedRow] = []

    def flush() -> None:
        name = shard_name(len(names))
        pq.write_table(rows_to_table(buf), directory / name)
        names.append(name)
        buf.clear()

    for row in rows:
        if stats is not None:
            stats.add_row(row)
        buf.append(row)
        if len(buf) >= rows_per_shard:
            flush()
    if buf or not names:
        flush()
    return names


def input_entries(paths: list[Path], documents: dict[str, int]) -> list[dict[str, Any]]:
    """``[{path, sha256, documents}]`` for the manifest; ``documents`` maps a file path to kept documents/items.

    A directory input is hashed as a whole and credited with the documents read from files under it.
    """
    from kcpt.hashing import sha256_dir

    out = []
    for p in paths:
        if p.is_dir():
            kept = sum(n for src, n in documents.items() if Path(src) == p or p in Path(src).parents)
            out.append({"path": str(p), "sha256": sha256_dir(p), "documents": kept})
        else:
            out.append({"path": str(p), "sha256": sha256_file(p), "documents": documents.get(str(p), 0)})
    return out


def finish_prepared(tmp: Path, *, tokenizer, stats: PackStats, kind: str, inputs: list[dict[str, Any]],
                    report, shards: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save the tokenizer and write ``manifest.json`` into the (temporary) dataset dir; returns the manifest."""
    save_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
    manifest: dict[str, Any] = {
        "format": "kcpt-packed-v1",
        "kind": kind,
        "seq_len": stats.seq_len,
        "rows": stats.rows,
        "tokens": stats.tokens,
        "padding": stats.padding,
        "segments": stats.segments,
        "label_tokens": stats.label_tokens,
        "pack_efficiency": round(stats.efficiency, 6),
        "tokenizer_sha256": tokenizer_sha256(tmp / TOKENIZER_DIR),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "inputs": inputs,
        "rejects": report.counts,
        "notices": report.notices,
        "reject_examples": report.to_dict()["examples"],
        "shards": shards,
        "kcpt_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return manifest


def write_prepared(out_dir: str | Path, rows: Iterable[PackedRow], *, tokenizer, seq_len: int, kind: str,
                   inputs: list[dict[str, Any]], report, extra: dict[str, Any] | None = None,
                   rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, overwrite: bool = False) -> dict[str, Any]:
    """Write packed ``rows`` (consumed as a stream), the tokenizer and the manifest to ``out_dir`` atomically.

    ``inputs``: ``[{path, sha256, documents}]`` (see :func:`input_entries`; it may be filled while ``rows`` is
    consumed — it is read after); ``report``: the RejectReport of reading/cleaning/encoding (read after the
    rows are consumed); ``extra``: more manifest keys. Returns the manifest.
    """
    stats = PackStats(seq_len)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        shards = write_shards(rows, tmp, rows_per_shard=rows_per_shard, stats=stats)
        return finish_prepared(tmp, tokenizer=tokenizer, stats=stats, kind=kind, inputs=inputs, report=report,
                               shards=shards, extra=extra)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset (InputError if ``directory`` is not one)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise InputError("not a prepared dataset (no manifest.json); run `kcpt prepare` first", path=str(directory))
    return json.loads(path.read_text(encoding="utf-8"))


def prepared_sha256(directory: str | Path) -> str:
    """SHA-256 of ``manifest.json``: identifies a prepared dataset (checkpoints record it)."""
    read_manifest(directory)
    return sha256_file(Path(directory) / MANIFEST)


def shard_paths(directory: str | Path) -> list[Path]:
    """The Parquet shard files of a prepared dataset, in order."""
    d = Path(directory)
    return [d / name for name in read_manifest(d)["shards"]]


def read_rows(directory: str | Path) -> pa.Table:
    """All rows of a prepared dataset as one pyarrow Table (:data:`ROW_SCHEMA`)."""
    return pa.concat_tables([pq.read_table(p, schema=ROW_SCHEMA) for p in shard_paths(directory)])


def iter_rows(directory: str | Path, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream the rows of a prepared dataset as record batches (bounded memory)."""
    for p in shard_paths(directory):
        yield from pq.ParquetFile(p).iter_batches(batch_size=batch_size)
