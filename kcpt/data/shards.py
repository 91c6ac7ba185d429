"""Prepared datasets on disk: Parquet shards + tokenizer + ``manifest.json``, written atomically.

Layout of a prepared directory ``DIR``::

    DIR/part-00000.parquet ...   rows with ROW_SCHEMA (kcpt.data.types): input_ids, position_ids, labels
                                 (list<int32>, length seq_len each) and source (string)
    DIR/tokenizer/               the tokenizer the ids belong to (save_pretrained)
    DIR/items.jsonl              exam datasets: the items the rows were encoded from (exam accuracy reads them;
                                 manifest ``items_sha256``)
    DIR/manifest.json            seq_len, rows, tokens (non-pad), pack_efficiency, tokenizer_sha256,
                                 inputs [{path, sha256, documents}], rejects {reason: n}, reject_lengths
                                 {reason: {tokens: n}} (``answer_truncated`` items' token lengths), kind, kcpt_version,
                                 created, shards, ... (see :func:`write_prepared`)

Everything is written into a temporary sibling directory that is renamed to ``DIR`` at the end, so an
interrupted run never leaves a half-written dataset at ``DIR``. :func:`prepared_sha256` (the hash of
``manifest.json`` without when/where it was made) identifies a prepared dataset; training binds checkpoints to
it.
"""

from __future__ import annotations

import json
import shutil
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
from kcpt.fsutil import remove_stale_siblings, sibling_name, temp_sibling
from kcpt.hashing import sha256_file, sha256_json

MANIFEST = "manifest.json"
PREPARED_FORMAT = "kcpt-packed-v1"
TOKENIZER_DIR = "tokenizer"
DEFAULT_ROWS_PER_SHARD = 8192
ROW_GROUP_ROWS = 1024
"""Rows per Parquet row group: the unit the streaming loader reads and shuffles (:mod:`kcpt.train.streams`)."""


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


def is_prepared_dir(path: Path) -> bool:
    """True if ``path`` is a directory kcpt wrote as a prepared dataset (its manifest says so)."""
    try:
        m = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(m, dict) and m.get("format") == PREPARED_FORMAT


def check_output_dir(out_dir: str | Path, inputs: Iterable[str | Path] = (), *, overwrite: bool = False) -> None:
    """Refuse an output directory that would destroy or swallow data kcpt did not write.

    ``out_dir`` must not be an input, hold an input (an ancestor of one) or lie inside an input directory; an
    existing ``out_dir`` is replaced only with ``overwrite`` AND only if it is empty or a prepared dataset
    (:func:`is_prepared_dir`). Raises :class:`InputError` naming the path and what to do.
    """
    out = Path(out_dir)
    ro = out.resolve()
    for inp in inputs:
        ri = Path(inp).resolve()
        if ri == ro or ro in ri.parents:
            raise InputError(f"the output directory is or holds the input {inp}: writing it would destroy the "
                             "input; choose another --out", path=str(out))
        if ri in ro.parents and ri.is_dir():
            raise InputError(f"the output directory lies inside the input directory {inp} (its shards would be "
                             "read as input next time); choose an --out outside the inputs", path=str(out))
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError("output directory already exists (remove it or choose another --out)", path=str(out))
        if out.is_symlink() or not out.is_dir():
            raise InputError("exists and is not a directory; --overwrite replaces only a prepared dataset",
                             path=str(out))
        if not is_prepared_dir(out) and next(out.iterdir(), None) is not None:
            raise InputError(f"exists and is not a prepared dataset (no kcpt {MANIFEST}); --overwrite replaces "
                             "only what kcpt wrote: choose another --out or remove it yourself", path=str(out))


@contextmanager
def atomic_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; on success it replaces ``out_dir`` by rename.

    An existing ``out_dir`` is an error unless ``overwrite``, and even then it is replaced only when it is an
    empty directory or a prepared dataset (:func:`check_output_dir`). On an exception the temporary dir is
    removed; temporary dirs of killed runs are removed first. An ``OSError`` (permissions, disk full) becomes an
    InputError naming the path.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite=overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(out)
        tmp = temp_sibling(out)
    except OSError as e:
        raise InputError(f"cannot create the output directory ({e.filename}: {e.strerror or e})",
                         path=str(out)) from None
    try:
        yield tmp
        if out.exists():
            check_output_dir(out, overwrite=overwrite)  # still ours after the (long) write
            old = sibling_name(out, "old", tmp.name[-8:])
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise InputError(f"cannot write the output: {e.strerror or e}", path=str(e.filename or out)) from None
        raise


def write_shards(rows: Iterable[PackedRow], directory: Path, *, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                 stats: PackStats | None = None) -> list[str]:
    """Write rows into ``directory/part-NNNNN.parquet`` files of up to ``rows_per_shard`` rows; returns the
    file names. ``stats`` (optional) is updated per row. At least one (possibly empty) shard is written."""
    names: list[str] = []
    buf: list[PackedRow] = []

    def flush() -> None:
        name = shard_name(len(names))
        pq.write_table(rows_to_table(buf), directory / name, row_group_size=ROW_GROUP_ROWS)
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


def input_entries(paths: list[str | Path], documents: dict[str, int], hashes: list[str] | None = None
                  ) -> list[dict[str, Any]]:
    """``[{path, sha256, documents}]`` for the manifest (``paths``: local paths or URIs, whose files are the keys
    below it); ``documents`` maps a file path to kept documents/items;
    ``hashes``: the inputs' content hashes when the caller already computed them (else they are computed here).

    A directory input is hashed over the files its walk reads and credited with the documents read from them.
    Each file's documents are credited once, to the first input that names or holds it (an input given twice,
    or a file inside a directory also given, is read once and counted once).
    """
    from kcpt.data.sources import input_sha256
    from kcpt.storage import is_uri

    def holds(p: str | Path, src: str) -> bool:
        if src == str(p) or src.startswith(f"{p}["):
            return True
        return src.startswith(str(p).rstrip("/") + "/") if is_uri(str(p)) else Path(p) in Path(src).parents

    credited = [0] * len(paths)
    for src, n in documents.items():  # each source file is credited to ONE input (the first that holds it)
        for i, p in enumerate(paths):
            if holds(p, src):
                credited[i] += n
                break
    hashes = hashes if hashes is not None else [input_sha256(Path(p)) for p in paths]
    return [{"path": str(p), "sha256": h, "documents": credited[i]}
            for i, (p, h) in enumerate(zip(paths, hashes, strict=True))]


def finish_prepared(tmp: Path, *, tokenizer, stats: PackStats, kind: str, inputs: list[dict[str, Any]],
                    report, shards: list[str], extra: dict[str, Any] | None = None,
                    items: list[Any] | None = None) -> dict[str, Any]:
    """Save the tokenizer, the exam ``items`` (as ``items.jsonl``, :data:`kcpt.data.exam_io.ITEMS_FILE`) and
    ``manifest.json`` into the (temporary) dataset dir; returns the manifest."""
    from kcpt.data.exam_io import ITEMS_FILE, write_items_file
    from kcpt.model.tokenizer import save_tokenizer, tokenizer_sha256  # transformers: only when writing

    save_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
    item_keys: dict[str, Any] = {}
    if items is not None:
        write_items_file(tmp / ITEMS_FILE, items)
        item_keys = {"items_file": ITEMS_FILE, "items": len(items), "items_sha256": sha256_file(tmp / ITEMS_FILE)}
    manifest: dict[str, Any] = {
        "format": PREPARED_FORMAT,
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
        "reject_lengths": report.to_dict()["lengths"],
        "shards": shards,
        **item_keys,
        "kcpt_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return manifest


def write_prepared(out_dir: str | Path, rows: Iterable[PackedRow], *, tokenizer, seq_len: int, kind: str,
                   inputs: list[dict[str, Any]], report, extra: dict[str, Any] | None = None,
                   rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, overwrite: bool = False,
                   items: list[Any] | None = None) -> dict[str, Any]:
    """Write packed ``rows`` (consumed as a stream), the tokenizer and the manifest to ``out_dir`` atomically.

    ``inputs``: ``[{path, sha256, documents}]`` (see :func:`input_entries`; it may be filled while ``rows`` is
    consumed — it is read after); ``report``: the RejectReport of reading/cleaning/encoding (read after the
    rows are consumed); ``extra``: more manifest keys; ``items`` (exam datasets): the encoded ExamItems (read
    after the rows are consumed), written as ``items.jsonl``. Returns the manifest.
    """
    stats = PackStats(seq_len)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        shards = write_shards(rows, tmp, rows_per_shard=rows_per_shard, stats=stats)
        return finish_prepared(tmp, tokenizer=tokenizer, stats=stats, kind=kind, inputs=inputs, report=report,
                               shards=shards, extra=extra, items=items)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset (InputError if ``directory`` is not one)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise InputError("not a prepared dataset (no manifest.json); run `kcpt prepare` first", path=str(directory))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        manifest = e
    if not isinstance(manifest, dict):
        raise InputError(f"not valid JSON ({manifest}): the prepared dataset is damaged; delete {directory} and run "
                         "again (kcpt prepares it anew)", path=str(path))
    return manifest


IDENTITY_IGNORED = ("created", "kcpt_version", "pipeline", "cache_key", "tokenizer_dir", "reject_examples")
"""Manifest keys that say when, where and by which pipeline a dataset was prepared, not what its rows are."""


def prepared_sha256(directory: str | Path) -> str:
    """Identity of a prepared dataset (checkpoints record it; a full resume must find it unchanged): the SHA-256 of
    its manifest without :data:`IDENTITY_IGNORED` keys and without file paths (each input keeps its content hash and
    document count). So the same inputs prepared again — after a lost cache, on a fresh node, under another
    ``prepared_root`` or by the other pipeline — keep it, and any change to the rows (inputs, tokenizer,
    ``seq_len``, filters, template, counts) changes it."""
    m = read_manifest(directory)
    ident = {k: v for k, v in m.items() if k not in IDENTITY_IGNORED}
    ident["inputs"] = [{k: v for k, v in i.items() if k != "path"} for i in m.get("inputs", [])]
    if isinstance(m.get("dataset"), dict):
        ident["dataset"] = {k: v for k, v in m["dataset"].items() if k != "inputs"}
    return sha256_json(ident)


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


def fetch_prepared(ref: str | Path, *, shards: bool = True) -> Path:
    """The local directory of prepared dataset ``ref``: a local path as is; a URI downloaded once per node into
    scratch and reused while its manifest (uploaded last) is unchanged (:func:`kcpt.storage.fetch_tree`).
    ``shards=False``: only the manifest and the tokenizer (into a separate mirror): the streaming loader reads
    the shards from the URI itself."""
    from kcpt import storage

    if not storage.is_uri(str(ref)):
        return Path(ref)
    try:
        if not shards:
            return storage.fetch_tree(str(ref), marker=MANIFEST, skip=lambda n: n.endswith(".parquet"),
                                      mirror_suffix=".meta")
        return storage.fetch_tree(str(ref), marker=MANIFEST)
    except FileNotFoundError as e:
        raise InputError(f"prepared dataset not found or incompletely uploaded ({e}); prepare it again",
                         path=str(ref)) from None
