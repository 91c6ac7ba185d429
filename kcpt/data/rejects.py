"""Counting what the data pipeline drops or fixes, so nothing disappears silently.

A :class:`RejectReport` counts *rejects* (a record/document/line that was dropped, by reason) and *notices*
(something fixed without dropping: a UTF-8 BOM stripped, CRLF line endings normalised, a file skipped while
expanding a directory). For each reason it keeps the first ``max_examples`` messages; every message already
names the file, the line (or row) and the field, e.g. ``data.jsonl: line 17: field 'text': missing``.

Strict mode: reading/cleaning functions take ``strict: bool``; when True, what would be counted as a reject
raises :class:`~kcpt.errors.InputError` instead (notices never raise). :func:`reject` implements that switch.
"""

from __future__ import annotations

from collections import Counter

from kcpt.errors import InputError


class RejectReport:
    """Counts dropped/skipped records by reason and non-dropping notices by kind, with example messages."""

    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self._rejects: Counter[str] = Counter()
        self._notices: Counter[str] = Counter()
        self._examples: dict[str, list[str]] = {}
        self._notice_examples: dict[str, list[str]] = {}
        self._lengths: dict[str, Counter[int]] = {}

    def add(self, reason: str, message: str, *, length: int | None = None) -> None:
        """Count one dropped item under ``reason``; ``message`` names file/line/field; ``length``: its size in
        tokens when known (``answer_truncated``), kept as a histogram so a fix can be computed later."""
        self._rejects[reason] += 1
        if length is not None:
            self._lengths.setdefault(reason, Counter())[int(length)] += 1
        ex = self._examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(message)

    def note(self, kind: str, message: str) -> None:
        """Count one non-dropping notice (e.g. ``bom_stripped``, ``crlf_normalised``)."""
        self._notices[kind] += 1
        ex = self._notice_examples.setdefault(kind, [])
        if len(ex) < self.max_examples:
            ex.append(message)

    def merge(self, other: RejectReport) -> None:
        """Add ``other``'s counts; keep examples up to ``max_examples`` per reason."""
        self._rejects.update(other._rejects)
        self._notices.update(other._notices)
        for reason, hist in other._lengths.items():
            self._lengths.setdefault(reason, Counter()).update(hist)
        for mine, theirs in ((self._examples, other._examples), (self._notice_examples, other._notice_examples)):
            for key, msgs in theirs.items():
                ex = mine.setdefault(key, [])
                ex.extend(msgs[: max(0, self.max_examples - len(ex))])

    @property
    def counts(self) -> dict[str, int]:
        """Reason → number of rejected items (sorted by reason)."""
        return dict(sorted(self._rejects.items()))

    @property
    def notices(self) -> dict[str, int]:
        """Notice kind → count (sorted by kind)."""
        return dict(sorted(self._notices.items()))

    @property
    def lengths(self) -> dict[str, dict[int, int]]:
        """Reason → {length in tokens: items} for the rejects whose length was recorded (sorted)."""
        return {r: dict(sorted(h.items())) for r, h in sorted(self._lengths.items())}

    @property
    def total(self) -> int:
        """Number of rejected items over all reasons."""
        return sum(self._rejects.values())

    def to_dict(self) -> dict:
        """``{"rejects": {reason: n}, "notices": {kind: n}, "examples": {reason_or_kind: [msg, ...]}}``."""
        examples = {k: list(v) for k, v in sorted(self._examples.items())}
        for k, v in sorted(self._notice_examples.items()):
            examples.setdefault(k, []).extend(v)
        return {"rejects": self.counts, "notices": self.notices, "examples": examples,
                "lengths": {r: {str(k): n for k, n in h.items()} for r, h in self.lengths.items()}}

    @classmethod
    def from_dict(cls, data: dict, max_examples: int = 5) -> RejectReport:
        """Rebuild a report from :meth:`to_dict` output (e.g. read back from a manifest or a Ray task)."""
        rep = cls(max_examples=max_examples)
        rep._rejects.update(data.get("rejects", {}))
        rep._notices.update(data.get("notices", {}))
        for reason, hist in (data.get("lengths") or {}).items():
            rep._lengths[reason] = Counter({int(k): int(n) for k, n in hist.items()})
        for key, msgs in data.get("examples", {}).items():
            target = rep._examples if key in rep._rejects else rep._notice_examples
            target[key] = list(msgs)[:max_examples]
        return rep

    def summary(self) -> str:
        """A small human-readable table (for the CLI): counts per reason with the first example message."""
        if not self._rejects and not self._notices:
            return "no rejects, no notices"
        lines = []
        for title, counts, examples in (("rejected", self._rejects, self._examples),
                                        ("notices", self._notices, self._notice_examples)):
            if not counts:
                continue
            lines.append(f"{title}:")
            width = max(len(k) for k in counts)
            for key, n in sorted(counts.items()):
                first = examples.get(key, [""])[0] if examples.get(key) else ""
                lines.append(f"  {key:<{width}}  {n:>8}  {first}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RejectReport(rejects={self.counts}, notices={self.notices})"


def reject(report: RejectReport, reason: str, message: str, *, strict: bool, path: str | None = None,
           line: int | None = None, field: str | None = None, length: int | None = None) -> None:
    """Count a reject in ``report`` — or, with ``strict``, raise :class:`InputError`.

    The message is prefixed with ``path: line N: field 'f':`` (the same text in both modes).
    """
    err = InputError(f"{message} [{reason}]", path=path, line=line, field=field)
    if strict:
        raise err
    report.add(reason, str(err), length=length)
