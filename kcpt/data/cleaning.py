"""Normalising raw documents, quality filters (after the CPT seeds' heuristics) and exact dedup.

Order per document (:func:`clean_documents`): :func:`normalize_text` → ``empty`` → the quality filters of
:func:`quality_reject_reason` (``too_short``, ``hangul_ratio``, ``repeated_lines``, ``repeated_ngrams``, in
that order; the first that fires is the reason) → exact dedup by SHA-256 of the normalised text
(``duplicate``). Every drop is counted in the :class:`~kcpt.data.rejects.RejectReport` by reason.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator

from kcpt.config import FilterConfig
from kcpt.data.rejects import RejectReport, reject
from kcpt.data.types import Document

# C0/C1 control characters except \t and \n, a stray BOM / zero-width no-break space, and the other line/page
# breaks (VT, FF, NEL, LS, PS) left at a line's start by _MID_LINE_BREAK: dropped.
_CONTROL = {c: None for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0), 0xFEFF,
                              0x2028, 0x2029]}
_MID_LINE_BREAK = re.compile("(?<=[^\n])[\x0b\x0c\x85\u2028\u2029]")
"""A line or page break of another kind inside a line (a PDF's form feed between two pages' words): it ends the line
(deleted, it would glue the words on either side together); at a line's start there is nothing to separate."""
_TRAILING_WS = re.compile(r"[ \t\f\v\u00a0\u3000]+$", re.MULTILINE)
_HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\ud7b0-\ud7ff]+")
_LATIN = re.compile("[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f]+")
_CJK = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff]+")


def strip_controls(text: str) -> str:
    """``text`` without control characters (``\\n`` and ``\\t`` kept), a line/page break of another kind inside a
    line turned into ``\\n`` (:data:`_MID_LINE_BREAK`). Line ends must already be LF."""
    return _MID_LINE_BREAK.sub("\n", text).translate(_CONTROL)


def has_visible(text: str) -> bool:
    """Whether ``text`` holds a character that is neither whitespace nor a format character (zero-width space,
    joiners, BOM: Unicode category Cf)."""
    return any(not ch.isspace() and unicodedata.category(ch) != "Cf" for ch in text)


def normalize_text(text: str) -> str:
    """NFC; CRLF and lone CR → LF, and VT, FF, NEL, LS, PS inside a line too; drop control characters (keep ``\\n``
    and ``\\t``); strip trailing whitespace of every line; drop leading/trailing blank lines. Idempotent."""
    text = strip_controls(text.replace("\r\n", "\n").replace("\r", "\n"))
    text = unicodedata.normalize("NFC", text)
    text = _TRAILING_WS.sub("", text)
    return text.strip("\n")


def _count(pattern: re.Pattern[str], text: str) -> int:
    return sum(len(m) for m in pattern.findall(text))


def hangul_ratio(text: str) -> float:
    """Hangul characters (syllables + jamo) / letters (Hangul + Latin + CJK ideographs); 0.0 if no letters.

    Digits, punctuation and whitespace count for neither.
    """
    hangul = _count(_HANGUL, text)
    letters = hangul + _count(_LATIN, text) + _count(_CJK, text)
    return hangul / letters if letters else 0.0


def duplicate_line_fraction(text: str) -> float:
    """Fraction of non-empty lines (whitespace-stripped) that repeat an earlier line of the same text."""
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def top_ngram_fraction(text: str, n: int) -> float:
    """Share of the whitespace words covered by the occurrences of the most frequent word ``n``-gram
    (``count · n / words``, at most 1); 0.0 when no n-gram repeats, so a text without repetition is never
    flagged. A loop of an L-word phrase scores about ``min(1, n / L)``."""
    words = text.split()
    if len(words) < n:
        return 0.0
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    top = max(grams.values())
    return min(1.0, top * n / len(words)) if top > 1 else 0.0


def quality_reject_reason(text: str, filters: FilterConfig) -> str | None:
    """First quality filter that ``text`` (already normalised) fails, or None:

    - ``too_short``: fewer than ``min_chars`` characters (after stripping surrounding whitespace);
    - ``hangul_ratio``: :func:`hangul_ratio` < ``min_hangul_ratio``;
    - ``repeated_lines``: :func:`duplicate_line_fraction` > ``max_dup_line_frac``;
    - ``repeated_ngrams``: :func:`top_ngram_fraction` (``ngram_n``) > ``max_top_ngram_frac``.
    """
    if len(text.strip()) < filters.min_chars:
        return "too_short"
    if hangul_ratio(text) < filters.min_hangul_ratio:
        return "hangul_ratio"
    if duplicate_line_fraction(text) > filters.max_dup_line_frac:
        return "repeated_lines"
    if top_ngram_fraction(text, filters.ngram_n) > filters.max_top_ngram_frac:
        return "repeated_ngrams"
    return None


def _why(reason: str, text: str, filters: FilterConfig) -> str:
    if reason == "too_short":
        return f"{len(text.strip())} characters < min_chars={filters.min_chars}"
    if reason == "hangul_ratio":
        return f"Hangul ratio {hangul_ratio(text):.3f} < min_hangul_ratio={filters.min_hangul_ratio}"
    if reason == "repeated_lines":
        return (f"repeated-line fraction {duplicate_line_fraction(text):.3f} > "
                f"max_dup_line_frac={filters.max_dup_line_frac}")
    return (f"top {filters.ngram_n}-gram covers {top_ngram_fraction(text, filters.ngram_n):.3f} > "
            f"max_top_ngram_frac={filters.max_top_ngram_frac}")


def clean_documents(docs: Iterable[Document], filters: FilterConfig, report: RejectReport, *,
                    strict: bool = False) -> Iterator[Document]:
    """Yield normalised documents that pass the filters, first occurrence only (when ``filters.dedup``).

    Drops are counted in ``report`` as ``empty``, a :func:`quality_reject_reason`, or ``duplicate`` (the
    message names the kept document); with ``strict`` each drop raises :class:`~kcpt.errors.InputError`.
    ``doc_id``, ``source`` and ``meta`` are kept; ``meta["sha256"]`` is set to the normalised text's hash.
    """
    seen: dict[str, str] = {}
    for doc in docs:
        text = normalize_text(doc.text)
        where = {"path": doc.source, "line": doc.meta.get("line")}
        label = f"document {doc.doc_id}"
        if not text.strip():
            reject(report, "empty", f"{label}: empty after normalisation", strict=strict, **where)
            continue
        reason = quality_reject_reason(text, filters)
        if reason is not None:
            reject(report, reason, f"{label}: {_why(reason, text, filters)}", strict=strict, **where)
            continue
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if filters.dedup:
            if digest in seen:
                reject(report, "duplicate", f"{label}: same text as {seen[digest]}", strict=strict, **where)
                continue
            seen[digest] = doc.doc_id
        yield Document(text=text, source=doc.source, doc_id=doc.doc_id, meta={**doc.meta, "sha256": digest})
