"""Reading raw documents from files: ``.txt``, ``.jsonl``, ``.parquet`` and local HF ``save_to_disk`` dirs.

Text files are streamed line by line in binary mode and decoded per line, so a bad line is reported with its
1-based line number and a huge single line is skipped without being held in memory:

- invalid UTF-8 → reason ``invalid_utf8`` (never replaced silently); the message gives the byte column;
- a line longer than ``max_line_chars`` characters → reason ``line_too_long`` (the rest of the line is skipped
  in 1 MiB chunks);
- a UTF-8 BOM at the start of the file is stripped (notice ``bom_stripped``); CRLF line endings are normalised
  to LF (notice ``crlf_normalised``, once per file); in a ``.txt`` file a bare CR (classic Mac) is a line break
  too (notice ``cr_normalised``).

Formats:

- ``.txt``: ``txt_split="file"`` (default): the whole file is one document. ``txt_split="blank_lines"``: a run
  of two or more consecutive blank lines (lines holding only whitespace) ends a document; a single blank line
  stays inside the document as a paragraph break; leading/trailing blank lines are dropped. A document that
  contains a bad line is dropped whole (counted once, with the first bad line's number).
- ``.jsonl``: one JSON object per line, the text in ``text_field``. Blank lines are skipped (notice
  ``blank_line``). Bad JSON → ``bad_json`` (with the parser's message), not an object → ``not_object``, field
  absent / null / not a string → ``missing_field``.
- ``.parquet``: the ``text_field`` column (must exist and be a string column, else :class:`InputError`);
  null values → ``missing_field`` (the message names the 1-based row).
- a directory holding a dataset saved with ``datasets.Dataset(Dict).save_to_disk``: read with
  ``datasets.load_from_disk``; a ``DatasetDict``'s splits are read in sorted name order.

``strict=True`` raises :class:`InputError` wherever a reject would be counted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from kcpt import storage
from kcpt.data.rejects import RejectReport, reject
from kcpt.data.types import Document
from kcpt.errors import InputError

TEXT_EXTENSIONS = (".txt", ".jsonl")
FILE_EXTENSIONS = (".txt", ".jsonl", ".parquet")
SUPPORTED = "'.txt', '.jsonl', '.parquet', or a directory saved with datasets' save_to_disk"
_BOM = b"\xef\xbb\xbf"
_SKIP_CHUNK = 1 << 20


def is_hf_dataset_dir(path: Path) -> bool:
    """True if ``path`` is a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def _check_file(path: Path) -> None:
    if path.suffix.lower() not in FILE_EXTENSIONS:
        raise InputError(f"unsupported file extension '{path.suffix or '(none)'}'; supported: {SUPPORTED}",
                         path=str(path))


def _stat(path: Path) -> os.stat_result:
    """``os.stat`` (following links) with an InputError that says what is wrong with the path."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(f"dangling symbolic link (to '{os.readlink(path)}')", path=str(path)) from None
        raise InputError("input path does not exist", path=str(path)) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError("symbolic link loop (the link points back to itself)", path=str(path)) from None
        raise InputError(f"cannot access: {e.strerror}", path=str(path)) from None


def check_inputs_exist(inputs: Sequence[str], *, where: str) -> None:
    """Cheap check of config ``inputs`` (no reading, no demo build): each non-``demo:`` input exists and is a
    regular file or a directory. InputError names ``where`` and the input."""
    from kcpt.data.demo import SPLITS

    for inp in inputs:
        try:
            if inp.startswith("demo:"):
                if inp[len("demo:"):] not in SPLITS:
                    raise InputError(f"unknown demo split; known: {', '.join(SPLITS)}", path=inp)
                continue
            if storage.is_uri(inp):
                storage.check_uri(inp, where)
                store, rel = storage.store_and_rel(inp)
                if not store.is_file(rel) and not store.walk(rel):
                    raise InputError("input URI does not exist (no object or prefix there)", path=inp)
                continue
            st = _stat(Path(inp).expanduser())
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise InputError("not a regular file or a directory (a FIFO, socket or device)", path=inp)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None


def iter_input_files(paths: Sequence[str | Path], *, report: RejectReport | None = None) -> list[Path]:
    """Expand ``paths`` into the input units to read, in a deterministic order.

    A file must have a supported extension (else :class:`InputError` naming it and listing the supported
    ones). A HF ``save_to_disk`` directory is one unit. Any other directory is walked recursively in sorted
    order, keeping files with a supported extension and HF dataset dirs; other files and hidden entries (a name
    starting with ``.``: a hidden directory is not entered) are skipped, each noted as ``skipped_file`` in
    ``report`` when given. A missing path, a dangling link, a link
    loop or a special file (FIFO, socket, device) named explicitly raises InputError.

    The walk follows symbolic links but never enters a directory twice: a link back to an enclosing directory
    is noted as ``symlink_loop``, another way to reach a directory or file already taken (a second link, the
    same path given twice) as ``duplicate_input``; each file is read once. Special files met in a walk are
    noted as ``special_file``, broken links (dangling, self-referencing, unreadable) as ``bad_symlink``; none
    is opened, so a FIFO never blocks the walk.
    """
    out: list[Path] = []
    seen: dict[tuple[int, int], Path] = {}

    def note(kind: str, message: str) -> None:
        if report is not None:
            report.note(kind, message)

    def take(p: Path, st: os.stat_result) -> bool:
        key = (st.st_dev, st.st_ino)
        if key in seen:
            note("duplicate_input", f"{p}: same {'directory' if stat.S_ISDIR(st.st_mode) else 'file'} as "
                 f"{seen[key]}; read once")
            return False
        seen[key] = p
        return True

    def walk(root: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            children = sorted(os.scandir(root), key=lambda c: c.name)
        except OSError as e:
            raise InputError(f"cannot list directory: {e.strerror}", path=str(root)) from None
        for entry in children:
            child = Path(entry.path)
            if entry.name.startswith("."):
                note("skipped_file", f"{child}: skipped (hidden: its name starts with '.'; name it explicitly to read "
                     "it)")
                continue
            try:
                st = os.stat(child)
            except OSError as e:
                if os.path.islink(child):
                    what = "symbolic link loop" if e.errno == errno.ELOOP else (
                        "dangling symbolic link" if isinstance(e, FileNotFoundError) else e.strerror)
                    note("bad_symlink", f"{child}: {what}; skipped")
                    continue
                raise InputError(f"cannot access: {e.strerror}", path=str(child)) from None
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    note("symlink_loop", f"{child}: symbolic link back to an enclosing directory; not followed")
                    continue
                if not take(child, st):
                    continue
                if is_hf_dataset_dir(child):
                    out.append(child)
                else:
                    walk(child, ancestors | {key})
            elif stat.S_ISREG(st.st_mode):
                if child.suffix.lower() in FILE_EXTENSIONS:
                    if take(child, st):
                        out.append(child)
                else:
                    note("skipped_file", f"{child}: skipped (extension '{child.suffix}' is not one of {SUPPORTED})")
            else:
                note("special_file", f"{child}: not a regular file (a FIFO, socket or device); skipped")

    for raw in paths:
        p = Path(raw)
        st = _stat(p)
        if stat.S_ISREG(st.st_mode):
            _check_file(p)
            if take(p, st):
                out.append(p)
        elif stat.S_ISDIR(st.st_mode):
            if not take(p, st):
                continue
            if is_hf_dataset_dir(p):
                out.append(p)
                continue
            n = len(out)
            walk(p, frozenset({(st.st_dev, st.st_ino)}))
            if len(out) == n:
                note("empty_directory", f"{p}: no readable inputs found ({SUPPORTED})")
        else:
            raise InputError("not a regular file or a directory (a FIFO, socket or device); kcpt reads only "
                             "regular files", path=str(p))
    return out


def input_sha256(path: Path) -> str:
    """Content hash of one input: a file's SHA-256; for a walked directory, the hash of the relative names and
    hashes of exactly the files the walk reads (links followed, loops and duplicates skipped); a HF
    ``save_to_disk`` directory is hashed whole."""
    from kcpt.hashing import sha256_dir, sha256_file

    with reading(path):
        if not path.is_dir():
            return sha256_file(path)
        if is_hf_dataset_dir(path):
            return sha256_dir(path)
        h = hashlib.sha256()
        for f in iter_input_files([path]):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(b"\0")
            with reading(f):
                h.update((sha256_dir(f) if f.is_dir() else sha256_file(f)).encode())
        return h.hexdigest()


def input_stat(path: Path) -> list[list[Any]]:
    """Cheap identity of one input, from ``os.stat`` only (no byte is read): ``[[name, size, mtime_ns], ...]``
    for the file itself (name ``""``), for exactly the files a directory walk reads, or for every file of a HF
    ``save_to_disk`` directory (names relative to ``path``). Used as the prepared-data cache key; a change in
    size or modification time changes it (a rewrite that keeps both, e.g. restored with ``os.utime``, does not:
    the same trade-off as make and rsync's quick check)."""
    def entry(f: Path, name: str) -> list[Any]:
        st = os.stat(f)
        return [name, st.st_size, st.st_mtime_ns]

    def tree(d: Path, prefix: str) -> list[list[Any]]:
        return [entry(f, f"{prefix}{f.relative_to(d).as_posix()}") for f in sorted(d.rglob("*")) if f.is_file()]

    with reading(path):
        if not path.is_dir():
            return [entry(path, "")]
        if is_hf_dataset_dir(path):
            return tree(path, "")
        out: list[list[Any]] = []
        for f in iter_input_files([path]):
            rel = f.relative_to(path).as_posix()
            out += tree(f, f"{rel}/") if f.is_dir() else [entry(f, rel)]
        return out


# --------------------------------------------------------------------------- line streaming


@dataclass
class BadLine:
    """A line that could not be read: ``reason`` is ``invalid_utf8`` or ``line_too_long``."""

    lineno: int
    reason: str
    message: str


@dataclass(frozen=True)
class LineRange:
    """The lines of a file that START in the byte range ``[start, end)`` (``end`` None: to the end of the file);
    ``first_lineno`` is the 1-based number of the first of them. A range not at 0 begins after the first newline
    at or after byte ``start - 1``, so consecutive ranges read every line exactly once (the line that crosses
    ``end`` belongs to this range, the partial line at ``start`` to the previous one)."""

    start: int = 0
    end: int | None = None
    first_lineno: int = 1


def open_binary(path: str | Path):
    """A binary, seekable, buffered reader for a local path or a URI (``s3://…``, through :mod:`pyarrow.fs`: the
    object is read directly, nothing is downloaded first)."""
    if storage.is_uri(str(path)):
        import io

        import pyarrow.fs as pafs

        fs, key = pafs.FileSystem.from_uri(str(path))
        return io.BufferedReader(fs.open_input_file(key), _SKIP_CHUNK)
    return open(path, "rb")


def _skip_line(f) -> int:
    """Read through the next newline (in chunks, whatever the line's length); returns the bytes skipped."""
    skipped = 0
    while True:
        chunk = f.readline(_SKIP_CHUNK)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def iter_text_lines(path: str | Path, *, report: RejectReport, max_line_chars: int = 1_000_000,
                    span: LineRange = LineRange(), on_crlf: Callable[[int], None] | None = None
                    ) -> Iterator[tuple[int, str] | BadLine]:
    """Stream ``(lineno, line)`` (1-based, without the line ending) or :class:`BadLine` for each line (of ``span``
    only: see :class:`LineRange`; ``path`` may be a URI, read with :func:`open_binary`).

    The caller decides how to count a :class:`BadLine`; BOM and CRLF fixes are noted in ``report`` here
    (``on_crlf(lineno)`` instead, when given, at every CRLF line: a caller reading one file in ranges notes it
    once per file). At most ``4 * max_line_chars + 4`` bytes of one line are held in memory.
    """
    limit = 4 * max_line_chars + 4
    crlf_noted = False
    with open_binary(path) as f:
        pos = 0
        if span.start > 0:
            f.seek(span.start - 1)
            pos = span.start - 1 + _skip_line(f)
        lineno = span.first_lineno - 1
        while span.end is None or pos < span.end:
            raw = f.readline(limit)
            if not raw:
                break
            pos += len(raw)
            lineno += 1
            cut = not raw.endswith(b"\n") and len(raw) == limit  # decided before the BOM shortens it
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
                report.note("bom_stripped", f"{path}: line 1: UTF-8 byte order mark stripped")
            if cut:
                rest = _skip_line(f)
                pos += rest
                yield BadLine(lineno, "line_too_long",
                              f"line of {len(raw) + rest} bytes is longer than max_line_chars={max_line_chars}")
                continue
            if raw.endswith(b"\r\n"):
                raw = raw[:-2]
                if on_crlf is not None:
                    on_crlf(lineno)
                elif not crlf_noted:
                    crlf_noted = True
                    report.note("crlf_normalised", f"{path}: line {lineno}: CRLF line endings normalised to LF")
            elif raw.endswith(b"\n"):
                raw = raw[:-1]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadLine(lineno, "invalid_utf8",
                              f"invalid UTF-8 at byte {e.start + 1} of the line ({e.reason}: {raw[e.start:e.end]!r})"
                              + _encoding_hint(raw, lineno))
                continue
            if len(text) > max_line_chars:
                yield BadLine(lineno, "line_too_long",
                              f"line of {len(text)} characters is longer than max_line_chars={max_line_chars}")
                continue
            yield lineno, text


def _encoding_hint(raw: bytes, lineno: int) -> str:
    """What to do about a line that is not UTF-8, when its bytes say which encoding the file has."""
    fix = "; kcpt reads UTF-8: convert the file, e.g. iconv -f {} -t utf-8 IN > OUT"
    if (lineno == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        return " (the file looks like UTF-16" + fix.format("utf-16") + ")"
    try:
        raw.decode("cp949")
    except UnicodeDecodeError:
        return ""
    return " (the line reads as CP949/EUC-KR, a common Korean encoding" + fix.format("cp949") + ")"


# --------------------------------------------------------------------------- per-format readers


def read_txt(path: str | Path, *, report: RejectReport, strict: bool, max_line_chars: int, txt_split: str
             ) -> Iterator[Document]:
    """The documents of one ``.txt`` file (see the module docstring for ``txt_split``)."""
    k = 0
    lines: list[str] = []
    start = 0
    bad: BadLine | None = None
    blank_run = 0

    def flush() -> Document | None:
        nonlocal k, lines, bad, start
        while lines and not lines[-1].strip():
            lines.pop()
        doc = None
        if lines or bad is not None or txt_split == "file":
            k += 1
            if bad is not None:
                reject(report, bad.reason, f"{bad.message}; document #{k} (from line {start or bad.lineno}) "
                       "dropped", strict=strict, path=str(path), line=bad.lineno)
            else:
                doc = Document(text="\n".join(lines), source=str(path), doc_id=f"{path}#{k}",
                               meta={"line": start or 1})
        lines, bad, start = [], None, 0
        return doc

    def pieces() -> Iterator[BadLine | tuple[int, str]]:  # a bare CR (classic Mac line ending) breaks a line too
        noted = False
        for item in iter_text_lines(path, report=report, max_line_chars=max_line_chars):
            if isinstance(item, BadLine) or "\r" not in item[1]:
                yield item
                continue
            if not noted:
                noted = True
                report.note("cr_normalised", f"{path}: line {item[0]}: bare CR line endings read as line breaks")
            for part in item[1].split("\r"):
                yield item[0], part

    for item in pieces():
        if isinstance(item, BadLine):
            if strict:
                reject(report, item.reason, item.message, strict=True, path=str(path), line=item.lineno)
            if txt_split == "blank_lines" and blank_run >= 2 and (lines or bad is not None):
                doc = flush()  # a bad line is a non-blank line: it starts the next document
                if doc is not None:
                    yield doc
            if bad is None:
                bad = item
            if not start:
                start = item.lineno
            blank_run = 0
            continue
        lineno, text = item
        if txt_split == "blank_lines":
            if not text.strip():
                blank_run += 1
                if lines or bad is not None:
                    lines.append(text)
                continue
            if blank_run >= 2 and (lines or bad is not None):
                doc = flush()
                if doc is not None:
                    yield doc
            blank_run = 0
        if not start:
            start = lineno
        lines.append(text)
    doc = flush()
    if doc is not None:
        yield doc


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: the object as a dict; ``_DuplicateKey`` when a key appears twice in it."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return d


def iter_json_lines(path: str | Path, *, report: RejectReport, strict: bool, max_line_chars: int,
                    span: LineRange = LineRange(), on_crlf: Callable[[int], None] | None = None
                    ) -> Iterator[tuple[int, object]]:
    """Stream ``(lineno, decoded JSON value)`` for each line of a JSONL file (any JSON type; the caller checks);
    ``span``/``on_crlf``: as in :func:`iter_text_lines`.

    Bad lines (``invalid_utf8``, ``line_too_long``), ``bad_json`` and ``duplicate_key`` (an object, at any depth,
    that names a key twice) are counted rejects (raised with ``strict``); blank lines are skipped with a
    ``blank_line`` notice.
    """
    for item in iter_text_lines(path, report=report, max_line_chars=max_line_chars, span=span, on_crlf=on_crlf):
        if isinstance(item, BadLine):
            reject(report, item.reason, item.message, strict=strict, path=str(path), line=item.lineno)
            continue
        lineno, line = item
        if not line.strip():
            report.note("blank_line", f"{path}: line {lineno}: blank line skipped")
            continue
        try:
            rec = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            reject(report, "duplicate_key", f"key '{e.key}' appears twice in one JSON object (JSON readers would "
                   "silently keep one of the values); write it once", strict=strict, path=str(path), line=lineno,
                   field=e.key)
            continue
        except json.JSONDecodeError as e:
            reject(report, "bad_json", f"not valid JSON: {e.msg} at column {e.colno}", strict=strict,
                   path=str(path), line=lineno)
            continue
        except ValueError as e:  # an integer of more than 4300 digits (int_max_str_digits)
            reject(report, "bad_json", f"not valid JSON: {str(e).split(';')[0]}", strict=strict,
                   path=str(path), line=lineno)
            continue
        except RecursionError:
            reject(report, "bad_json", "not valid JSON: nested too deeply", strict=strict, path=str(path),
                   line=lineno)
            continue
        yield lineno, rec


def read_jsonl(path: str | Path, *, text_field: str, report: RejectReport, strict: bool, max_line_chars: int,
               span: LineRange = LineRange(), on_crlf: Callable[[int], None] | None = None,
               meta_fields: Sequence[str] = ()) -> Iterator[Document]:
    """The documents of one JSONL file (or of the lines of ``span``; see :func:`iter_text_lines`); ``meta_fields``:
    record keys kept in ``Document.meta``."""
    where = {"path": str(path)}
    for lineno, rec in iter_json_lines(path, report=report, strict=strict, max_line_chars=max_line_chars,
                                       span=span, on_crlf=on_crlf):
        if not isinstance(rec, dict):
            reject(report, "not_object", f"expected a JSON object, got {type(rec).__name__}", strict=strict,
                   line=lineno, **where)
            continue
        text = rec.get(text_field)
        if not isinstance(text, str):
            what = "missing" if text_field not in rec else f"not a string ({type(text).__name__})"
            reject(report, "missing_field", what, strict=strict, line=lineno, field=text_field, **where)
            continue
        if not is_utf8_encodable(text):
            reject(report, "invalid_utf8", "text holds a lone surrogate escape (not encodable as UTF-8)",
                   strict=strict, line=lineno, field=text_field, **where)
            continue
        meta: dict = {"line": lineno}
        if isinstance(rec.get("id"), str | int):
            meta["id"] = rec["id"]
        meta.update({f: rec[f] for f in meta_fields if f in rec})
        yield Document(text=text, source=str(path), doc_id=f"{path}:{lineno}", meta=meta)


def is_utf8_encodable(text: str) -> bool:
    """False if ``text`` holds a lone surrogate (e.g. from a JSON ``"\\ud800"`` escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_text(typ) -> bool:
    """An Arrow string type: plain, large, view, or dictionary-encoded (a pandas ``category`` column)."""
    import pyarrow as pa

    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or getattr(pa.types, "is_string_view",
                                                                                 lambda _: False)(typ)


def open_parquet(path: str | Path, text_field: str):
    """``pyarrow.parquet.ParquetFile`` of a local path or URI whose ``text_field`` is a string column (else
    InputError naming the file and field)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(open_binary(path) if storage.is_uri(str(path)) else path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"cannot read as Parquet: {e}", path=str(path)) from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise InputError(f"no such column (columns: {schema.names})", path=str(path), field=text_field)
    typ = schema.field(text_field).type
    if not _is_text(typ):
        raise InputError(f"column must hold strings, found {typ}", path=str(path), field=text_field)
    return pf


def read_parquet(path: str | Path, *, text_field: str, report: RejectReport, strict: bool,
                 row_groups: list[int] | None = None, first_row: int = 1,
                 meta_fields: Sequence[str] = ()) -> Iterator[Document]:
    """The documents of one Parquet file (or of its ``row_groups``, whose first row is number ``first_row``);
    ``meta_fields``: columns kept in ``Document.meta``."""
    pf = open_parquet(path, text_field)
    try:
        yield from _parquet_docs(pf, path, text_field=text_field, report=report, strict=strict,
                                 row_groups=row_groups, first_row=first_row, meta_fields=meta_fields)
    finally:
        pf.close()


def _parquet_docs(pf, path: str | Path, *, text_field: str, report: RejectReport, strict: bool,
                  row_groups: list[int] | None, first_row: int, meta_fields: Sequence[str] = ()) -> Iterator[Document]:
    names = pf.schema_arrow.names
    extra = [f for f in dict.fromkeys(meta_fields) if f in names and f != text_field]
    row = first_row - 1
    for batch in pf.iter_batches(columns=[text_field, *extra], batch_size=1024, row_groups=row_groups):
        values = [batch.column(i).to_pylist() for i in range(1, len(extra) + 1)]
        for k, text in enumerate(_parquet_texts(batch.column(0))):
            row += 1
            if text is None:
                reject(report, "missing_field", f"row {row}: null", strict=strict, path=str(path), field=text_field)
                continue
            if isinstance(text, bytes):
                reject(report, "invalid_utf8", f"row {row}: {_utf8_error(text)}", strict=strict, path=str(path),
                       field=text_field)
                continue
            meta = {"row": row, **{f: v[k] for f, v in zip(extra, values, strict=True)}}
            yield Document(text=text, source=str(path), doc_id=f"{path}:row{row}", meta=meta)


def _parquet_texts(column) -> list[str | bytes | None]:
    """A Parquet string column's values; a value that is not UTF-8 (writers such as Spark do not check) comes back
    as its bytes, for the caller to count, instead of failing the whole batch."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        import pyarrow as pa

        raw = column.cast(pa.large_binary()).to_pylist()  # plain, large, view and dictionary strings alike
        out: list[str | bytes | None] = []
        for b in raw:
            try:
                out.append(None if b is None else b.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(b)
        return out


def _utf8_error(raw: bytes) -> str:
    """Where ``raw`` stops being UTF-8, and which encoding it reads as when that is telling."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"invalid UTF-8 at byte {e.start + 1} of the value ({e.reason}: {raw[e.start:e.end]!r})"
                + _encoding_hint(raw, 0))
    return "valid UTF-8"


def _read_hf_dir(path: Path, *, text_field: str, report: RejectReport, strict: bool,
                 meta_fields: Sequence[str] = ()) -> Iterator[Document]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a damaged dir
        raise InputError(f"cannot load with datasets.load_from_disk: {e}", path=str(path)) from None
    parts = sorted(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, ds in parts:
        label = f"{path}[{split}]" if split else str(path)
        if text_field not in ds.column_names:
            raise InputError(f"no such column (columns: {ds.column_names})", path=label, field=text_field)
        feat = ds.features[text_field]
        if not (isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string")):
            raise InputError(f"column must hold strings, found {feat}", path=label, field=text_field)
        extra = [f for f in dict.fromkeys(meta_fields) if f in ds.column_names and f != text_field]
        row = 0
        for batch in ds.select_columns([text_field, *extra]).iter(batch_size=1024):
            for k, text in enumerate(batch[text_field]):
                row += 1
                if text is None:
                    reject(report, "missing_field", f"row {row}: null", strict=strict, path=label, field=text_field)
                    continue
                meta = {"row": row, **{f: batch[f][k] for f in extra}}
                yield Document(text=text, source=label, doc_id=f"{label}:row{row}", meta=meta)


def read_documents(paths: Sequence[str | Path], *, text_field: str = "text", report: RejectReport,
                   strict: bool = False, max_line_chars: int = 1_000_000,
                   txt_split: Literal["file", "blank_lines"] = "file", progress: bool = False,
                   meta_fields: Sequence[str] = ()) -> Iterator[Document]:
    """Yield raw (uncleaned) :class:`Document` s from files/directories in ``paths`` (see module docstring).

    ``doc_id`` is ``<file>#<k>`` for the k-th document of a ``.txt``, ``<file>:<line>`` for JSONL and
    ``<file>:row<r>`` for Parquet/HF rows; ``meta`` holds ``line`` or ``row`` (1-based) and, for JSONL, ``id``
    when the record has one, plus each of ``meta_fields`` the record (JSONL key) or row (Parquet / HF column)
    has. Skips are counted in ``report`` (or raise with ``strict``).
    """
    if txt_split not in ("file", "blank_lines"):
        raise InputError(f"txt_split must be 'file' or 'blank_lines', got {txt_split!r}")
    files = iter_input_files(paths, report=report)
    bar = tqdm(total=len(files), unit="file", desc="reading", disable=not progress)
    try:
        for p in files:
            with reading(p):
                if p.is_dir():
                    yield from _read_hf_dir(p, text_field=text_field, report=report, strict=strict,
                                            meta_fields=meta_fields)
                elif p.suffix.lower() == ".txt":
                    yield from read_txt(p, report=report, strict=strict, max_line_chars=max_line_chars,
                                         txt_split=txt_split)
                elif p.suffix.lower() == ".jsonl":
                    yield from read_jsonl(p, text_field=text_field, report=report, strict=strict,
                                          max_line_chars=max_line_chars, meta_fields=meta_fields)
                else:
                    yield from read_parquet(p, text_field=text_field, report=report, strict=strict,
                                            meta_fields=meta_fields)
            bar.update(1)
    finally:
        bar.close()


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` while reading ``path`` (permission denied, I/O error, a file gone meanwhile) into an
    InputError naming the file."""
    try:
        yield
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", path=str(e.filename or path)) from None
