"""Reading and validating exam items from JSONL.

One JSON object per line::

    {"id": "q1", "question": "…", "choices": ["…", "…"], "answer": "…", "kind": "qa" | "example"}
    {"id": "e1", "prompt": "…\\n답: ", "answer": "…", "kind": "example"}

- ``id``: non-empty string (an integer is accepted and turned into a string); unique over all inputs of one
  call (a repeat is dropped as ``duplicate_id``, naming the first occurrence).
- exactly one of ``prompt`` (used verbatim, the answer follows it directly) and ``question`` (rendered with
  the exam template); both or neither → ``prompt_or_question``.
- ``choices`` (only with ``question``): a non-empty list of distinct non-empty strings (compared after
  :func:`normalize_answer`), else ``bad_choices``.
- ``answer``: non-empty string (``missing_field`` / ``empty_field``); with ``choices`` it is the text of the right
  choice (``answer_not_in_choices`` otherwise: a letter, a number or a text no choice has); ``kind``: ``qa`` or
  ``example`` (``unknown_kind``); a wrong type for any field → ``wrong_type``. A field given as ``null`` is absent.
- Line-level problems as for raw JSONL: ``invalid_utf8``, ``line_too_long``, ``bad_json``, ``not_object``.
- Unknown keys are allowed and noted once per key (notice ``unknown_key``).

Texts are NFC-normalised, CRLF/CR become LF and control characters are dropped as in raw text
(:func:`kcpt.data.cleaning.strip_controls`); nothing else is changed (a prompt's trailing space stays). A field
of only zero-width or other format characters is ``empty_field``.
Every message names the file, the 1-based line and the field. ``strict=True`` raises instead of counting.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kcpt.data.cleaning import has_visible, strip_controls
from kcpt.data.rejects import RejectReport, reject
from kcpt.data.sources import is_utf8_encodable, iter_input_files, iter_json_lines, reading
from kcpt.data.types import ExamItem
from kcpt.errors import InputError
from kcpt.storage import is_uri

EXAM_KINDS = ("qa", "example")
KNOWN_KEYS = {"id", "prompt", "question", "choices", "answer", "kind"}


def normalize_answer(text: str) -> str:
    """NFC, every run of whitespace → one space, stripped: how answers, choices and predictions are compared."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", strip_controls(text.replace("\r\n", "\n").replace("\r", "\n")))


class _Invalid(Exception):
    def __init__(self, reason: str, message: str, field: str | None) -> None:
        super().__init__(message)
        self.reason, self.message, self.field = reason, message, field


def _string(rec: dict[str, Any], key: str, *, required: bool) -> str | None:
    if key not in rec or rec[key] is None:
        if required:
            raise _Invalid("missing_field", "missing", key)
        return None
    val = rec[key]
    if not isinstance(val, str):
        raise _Invalid("wrong_type", f"must be a string, got {type(val).__name__}", key)
    if not has_visible(val):  # blank, or only zero-width / format characters
        raise _Invalid("empty_field", "empty" if not val.strip() else "empty (only invisible characters)", key)
    if not is_utf8_encodable(val):
        raise _Invalid("invalid_utf8", "holds a lone surrogate escape (not encodable as UTF-8)", key)
    return _nfc(val)


def parse_exam_record(rec: Any) -> ExamItem:
    """Validate one decoded JSON record into an :class:`ExamItem` (``source``/``line`` left unset).

    Raises ``_Invalid`` (reason, message, field) on the first problem found.
    """
    if not isinstance(rec, dict):
        raise _Invalid("not_object", f"expected a JSON object, got {type(rec).__name__}", None)
    raw_id = rec.get("id")
    if raw_id is None:
        raise _Invalid("missing_field", "missing", "id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise _Invalid("wrong_type", f"must be a string, got {type(raw_id).__name__}", "id")
    item_id = str(raw_id)
    if not item_id.strip():
        raise _Invalid("empty_field", "empty", "id")
    kind = rec.get("kind")
    if kind is None:
        raise _Invalid("missing_field", "missing", "kind")
    if kind not in EXAM_KINDS:
        raise _Invalid("unknown_kind", f"unknown kind {kind!r}; expected one of {list(EXAM_KINDS)}", "kind")
    has_p, has_q = rec.get("prompt") is not None, rec.get("question") is not None
    if has_p == has_q:
        which = "both 'prompt' and 'question'" if has_p else "neither 'prompt' nor 'question'"
        raise _Invalid("prompt_or_question", f"record has {which}; give exactly one",
                       "prompt" if has_p else "question")
    prompt = _string(rec, "prompt", required=False)
    question = _string(rec, "question", required=False)
    choices = None
    if rec.get("choices") is not None:
        ch = rec["choices"]
        if prompt is not None:
            raise _Invalid("bad_choices", "'choices' only go with 'question' (a 'prompt' is used verbatim)",
                           "choices")
        if not isinstance(ch, list) or not ch:
            raise _Invalid("bad_choices", f"must be a non-empty list of strings, got {type(ch).__name__}"
                           + (" (empty)" if isinstance(ch, list) else ""), "choices")
        for i, c in enumerate(ch):
            if not isinstance(c, str) or not has_visible(c) or not is_utf8_encodable(c):
                got = type(c).__name__ if not isinstance(c, str) else (
                    "an empty string" if not c.strip() else "only invisible characters" if not has_visible(c)
                    else "a lone surrogate escape")
                raise _Invalid("bad_choices", f"element {i} must be a non-empty string, got {got}", "choices")
        choices = [_nfc(c) for c in ch]
        first: dict[str, int] = {}
        for i, c in enumerate(choices):
            j = first.setdefault(normalize_answer(c), i)
            if j != i:
                raise _Invalid("bad_choices", f"element {i} repeats element {j} ({c!r}): the choices must differ",
                               "choices")
    answer = _string(rec, "answer", required=True)
    assert answer is not None
    if choices is not None and normalize_answer(answer) not in first:
        shown = ", ".join(repr(c) if len(c) <= 20 else repr(c[:20] + "…") for c in choices)
        raise _Invalid("answer_not_in_choices", f"{answer!r} is not one of its choices [{shown}]: the answer of a "
                       "multiple-choice item is the text of the right choice, not its letter or number", "answer")
    return ExamItem(id=item_id, answer=answer, kind=kind, prompt=prompt, question=question, choices=choices)


def is_exam_file(unit: str | Path, named: Sequence[str | Path], report: RejectReport) -> bool:
    """Whether an input unit (a file, a ``save_to_disk`` dir; a path or a URI) holds exam items: a ``.jsonl`` file.
    Another unit met in a directory walk is skipped with a ``skipped_file`` notice; one of the ``named`` inputs is
    an InputError (both pipelines call this)."""
    def norm(p: str | Path) -> str:
        return str(p) if is_uri(str(p)) else str(Path(p))

    if norm(unit).lower().endswith(".jsonl") and not (not is_uri(str(unit)) and Path(unit).is_dir()):
        return True
    if norm(unit) not in {norm(p) for p in named}:
        report.note("skipped_file", f"{unit}: skipped (exam items are read from .jsonl files only)")
        return False
    raise InputError("exam items are read from .jsonl files only (one item per line, docs/data-formats.md)",
                     path=str(unit))


def read_exam_items(paths: Sequence[str | Path], *, report: RejectReport, strict: bool = False,
                    kind: str | None = None, max_line_chars: int = 1_000_000) -> Iterator[ExamItem]:
    """Yield validated :class:`ExamItem` s from ``.jsonl`` files/directories (see module docstring).

    ``kind`` keeps only items of that kind (others are skipped after validation and the duplicate-id check, and
    counted as the notice ``other_kind``). ``source``/``line`` of each item give its file and 1-based line.
    """
    if kind is not None and kind not in EXAM_KINDS:
        raise InputError(f"kind must be one of {list(EXAM_KINDS)} or None, got {kind!r}")
    seen: dict[str, str] = {}
    noted_keys: set[str] = set()
    for path in iter_input_files(paths, report=report):
        if not is_exam_file(path, paths, report):
            continue
        with reading(path):
            yield from _items_of(path, report=report, strict=strict, kind=kind, max_line_chars=max_line_chars,
                                 seen=seen, noted_keys=noted_keys)


def _items_of(path: Path, *, report: RejectReport, strict: bool, kind: str | None, max_line_chars: int,
              seen: dict[str, str], noted_keys: set[str]) -> Iterator[ExamItem]:
    for lineno, rec in iter_json_lines(path, report=report, strict=strict, max_line_chars=max_line_chars):
        try:
            item = parse_exam_record(rec)
        except _Invalid as e:
            reject(report, e.reason, e.message, strict=strict, path=str(path), line=lineno, field=e.field)
            continue
        for key in sorted(set(rec) - KNOWN_KEYS - noted_keys):
            noted_keys.add(key)
            report.note("unknown_key", f"{path}: line {lineno}: unknown key '{key}' ignored")
        where = f"{path}: line {lineno}"
        if item.id in seen:
            reject(report, "duplicate_id", f"id {item.id!r} already used at {seen[item.id]}", strict=strict,
                   path=str(path), line=lineno, field="id")
            continue
        seen[item.id] = where
        if kind is not None and item.kind != kind:
            report.note("other_kind", f"{where}: kind {item.kind!r} skipped (keeping only {kind!r})")
            continue
        item.source, item.line = str(path), lineno
        yield item


ITEMS_FILE = "items.jsonl"
"""In a prepared exam dataset: the items its rows were encoded from (kept items only, in input order), one JSON
object per line with ``id, kind, answer, prompt, question, choices, source, line``; the manifest records its
sha256 (``items_sha256``), so a checkpoint's data hash covers it. Exam accuracy reads it in every worker."""


def item_record(item: ExamItem) -> dict[str, Any]:
    """``item`` as one line of :data:`ITEMS_FILE`."""
    return {"id": item.id, "kind": item.kind, "answer": item.answer, "prompt": item.prompt,
            "question": item.question, "choices": item.choices, "source": item.source, "line": item.line}


def write_items_file(path: Path, items: Sequence[ExamItem]) -> None:
    """Write ``items`` as :data:`ITEMS_FILE` lines (UTF-8, not ASCII-escaped)."""
    import json

    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(item_record(it), ensure_ascii=False) + "\n")


def read_items_file(path: str | Path) -> list[ExamItem]:
    """The items of an :data:`ITEMS_FILE` (written by ``kcpt prepare``; InputError naming the line if damaged)."""
    import json

    out: list[ExamItem] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                out.append(ExamItem(**json.loads(line)))
            except (ValueError, TypeError) as e:
                raise InputError(f"damaged exam items file ({e}); prepare the dataset again", path=str(path),
                                 line=lineno) from None
    return out
