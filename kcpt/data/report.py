"""What every job says about its data before it trains: one table, warnings with a fix, an optional limit.

:func:`data_table` renders one row per prepared dataset from its manifest — items/documents read, kept, rejected
by reason, rows, tokens, pack efficiency — and whether it was ``prepared`` now or ``reused`` from the cache.

A plan whose datasets read the embedded demo (``demo:…``) next to other inputs gets a warning naming the demo
ones: usually a ``--set`` that replaced some inputs and not the held-out sets.

Warning threshold (:func:`data_warnings`): a reject reason is worth a warning when it drops more than
:data:`WARN_FRACTION` (10 %) of a raw dataset's documents, or ANY item of an exam dataset (exam items are few and
each one is a question the model will not see). Each warning names the reason and the fix:

- ``answer_truncated``: ``data.seq_len=N covers P% of the items`` where N is the smallest length (rounded up to a
  multiple of 8) that fits :data:`COVER_TARGET` (95 %) of the dataset's items, computed from the token lengths of
  the dropped items that preparation records in the manifest (``reject_lengths``);
- raw filters (``hangul_ratio``, ``too_short``, ``repeated_lines``, ``repeated_ngrams``): the filter key and its
  value (``data.filters.min_hangul_ratio=0.3``), to lower if the data is what you want.

``data.max_reject_fraction`` (default None: off) turns it into an error: :func:`check_reject_limit` raises an
:class:`~kcpt.errors.InputError` naming the dataset, the reason(s), the fraction and the limit when one reason, or
all reasons together, drop more than that fraction of a dataset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kcpt.errors import InputError

WARN_FRACTION = 0.10
"""A reason that drops more than this fraction of a raw dataset's documents is warned about."""
COVER_TARGET = 0.95
"""The ``answer_truncated`` fix names the ``data.seq_len`` that fits this fraction of the items."""

FILTER_KEYS = {"too_short": "min_chars", "hangul_ratio": "min_hangul_ratio",
               "repeated_lines": "max_dup_line_frac", "repeated_ngrams": "max_top_ngram_frac"}
"""Raw reject reason → the ``data.filters`` key that decides it."""


@dataclass
class DatasetReport:
    """One dataset as the table shows it (from its manifest)."""

    name: str
    manifest: dict[str, Any]
    status: str = "prepared"
    """``prepared`` (now) or ``reused`` (from the cache)."""

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "?"))

    @property
    def kept(self) -> int:
        return sum(int(i.get("documents", 0)) for i in self.manifest.get("inputs", []))

    @property
    def rejects(self) -> dict[str, int]:
        return {k: int(v) for k, v in (self.manifest.get("rejects") or {}).items()}

    @property
    def notices(self) -> dict[str, int]:
        return {k: int(v) for k, v in (self.manifest.get("notices") or {}).items()}

    @property
    def read(self) -> int:
        return self.kept + sum(self.rejects.values())

    def fraction(self, reason: str) -> float:
        return self.rejects.get(reason, 0) / self.read if self.read else 0.0

    @property
    def reject_summary(self) -> str:
        """``reason n, …`` by count, most first; ``""`` when nothing was rejected."""
        return ", ".join(f"{k} {v}" for k, v in sorted(self.rejects.items(), key=lambda kv: -kv[1]))


def data_table(reports: list[DatasetReport]) -> str:
    """The data table (fixed-width text), one line per dataset."""
    head = ["dataset", "kind", "read", "kept", "rejected", "rows", "tokens", "pack", "cache"]
    body = []
    for r in reports:
        m = r.manifest
        rej = r.reject_summary or "-"
        body.append([r.name, r.kind, str(r.read), str(r.kept), rej, str(m.get("rows", "?")),
                     str(m.get("tokens", "?")), f"{float(m.get('pack_efficiency', 0)) * 100:.1f}%", r.status])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    right = {2, 3, 5, 6, 7}

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                strict=True))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def seq_len_fix(report: DatasetReport, target: float = COVER_TARGET) -> tuple[int, float, int] | None:
    """``(N, P, N_all)``: ``data.seq_len=N`` (a multiple of 8) fits the fraction P ≥ ``target`` of the items that
    were kept or dropped as ``answer_truncated``; ``N_all`` fits all of them. None when the lengths of the dropped
    items are not in the manifest (prepared by an older kcpt)."""
    hist = (report.manifest.get("reject_lengths") or {}).get("answer_truncated")
    dropped = report.rejects.get("answer_truncated", 0)
    if not hist or dropped == 0:
        return None
    lengths = sorted((int(k), int(n)) for k, n in hist.items())
    total = report.kept + dropped
    need = math.ceil(target * total)
    fits = report.kept  # every kept item fits the current seq_len
    n = lengths[-1][0]
    for length, count in lengths:
        fits += count
        if fits >= need:
            n = length
            break
    n = -(-n // 8) * 8
    covered = report.kept + sum(c for length, c in lengths if length <= n)
    return n, covered / total, -(-lengths[-1][0] // 8) * 8


def _warned(r: DatasetReport, reason: str) -> bool:
    return r.rejects.get(reason, 0) > 0 and (r.kind == "exam" or r.fraction(reason) > WARN_FRACTION)


def data_warnings(reports: list[DatasetReport], filters: Mapping[str, Any] | None = None) -> list[str]:
    """One line per (dataset, reason) above the threshold (module docstring), with the fix."""
    out = []
    for r in reports:
        unit = "items" if r.kind == "exam" else "documents"
        for reason, n in sorted(r.rejects.items(), key=lambda kv: -kv[1]):
            if not _warned(r, reason):
                continue
            msg = f"warning: {r.name}: {n} of {r.read} {unit} ({r.fraction(reason):.0%}) dropped as {reason}"
            if reason == "answer_truncated":
                fix = seq_len_fix(r)
                seq = r.manifest.get("seq_len")
                if fix is None:
                    msg += (f" (longer than data.seq_len={seq} tokens); raise data.seq_len (the dropped lengths "
                            "were not recorded: prepare again with this kcpt to get the value)")
                else:
                    n_fix, p, n_all = fix
                    msg += (f" (longer than data.seq_len={seq} tokens); fix: data.seq_len={n_fix} covers {p:.0%} of "
                            f"the items ({n_all} covers all)")
            elif reason in FILTER_KEYS:
                key = FILTER_KEYS[reason]
                value = (filters or r.manifest.get("filters") or {}).get(key, "?")
                msg += f"; the filter is data.filters.{key}={value} (change it if these documents are wanted)"
            else:
                msg += f"; see the examples in {r.name}'s manifest.json (reject_examples)"
            out.append(msg)
    for r in reports:  # not rejects (kept + rejected = read): the dataset keeps one kind by choice
        other = r.notices.get("other_kind", 0)
        if other:
            kind = (r.manifest.get("dataset") or {}).get("exam_kind")
            out.append(f"note: {r.name}: {other} items of another kind than {kind!r} were skipped "
                       f"(data.datasets.{r.name}.exam_kind); they are not in the read column")
    demo = [r.name for r in reports if _reads_demo(r)]
    mine = [r.name for r in reports if not _reads_demo(r)]
    if demo and mine:
        out.append(f"warning: {', '.join(demo)} read{'s' if len(demo) == 1 else ''} the embedded demo data while "
                   f"{', '.join(mine)} read{'s' if len(mine) == 1 else ''} other inputs, so the demo's text "
                   f"{'is' if len(demo) == 1 else 'are'} part of this run (a held-out set: its loss decides best "
                   f"checkpoints and stops); set data.datasets.<name>.inputs for each, e.g. --set "
                   f"'data.datasets.{demo[0]}.inputs=[path/to/{demo[0]}.jsonl]'")
    return out


def _reads_demo(r: DatasetReport) -> bool:
    return any(str(i).startswith("demo:") for i in (r.manifest.get("dataset") or {}).get("inputs", []))


def check_reject_limit(reports: list[DatasetReport], limit: float | None) -> None:
    """InputError when one reason, or all reasons together, drop more than ``limit`` of a dataset
    (``data.max_reject_fraction``)."""
    if limit is None:
        return
    for r in reports:
        unit = "items" if r.kind == "exam" else "documents"
        for reason, _ in sorted(r.rejects.items(), key=lambda kv: -kv[1]):
            if r.fraction(reason) > limit:
                raise InputError(f"data.max_reject_fraction: dataset '{r.name}' dropped {r.fraction(reason):.1%} of "
                                 f"its {r.read} {unit} as {reason}, above the limit {limit:g}")
        total = sum(r.rejects.values())
        if r.read and total / r.read > limit:
            raise InputError(f"data.max_reject_fraction: dataset '{r.name}' dropped {total / r.read:.1%} of its "
                             f"{r.read} {unit} ({r.reject_summary}), above the limit {limit:g}")


def load_reports(prepared: Mapping[str, Any], statuses: Mapping[str, str] | None = None) -> list[DatasetReport]:
    """Reports for ``prepared`` (name → local dir or URI, as :func:`kcpt.data.prepare.prepare_all` returns). A URI's
    manifest is fetched without its shards (the driver printing the table holds no copy of the corpus)."""
    from kcpt.data.shards import fetch_prepared, read_manifest

    return [DatasetReport(name, read_manifest(fetch_prepared(ref, shards=False)),
                          (statuses or {}).get(name, "prepared")) for name, ref in prepared.items()]


def announce_data(prepared: Mapping[str, Any], statuses: Mapping[str, str] | None, *, limit: float | None = None,
                  filters: Mapping[str, Any] | None = None) -> list[DatasetReport]:
    """Print the data table and its warnings on stdout (the console), then apply ``limit``
    (:func:`check_reject_limit`: InputError). Returns the reports."""
    reports = load_reports(prepared, statuses)
    print("\n".join(["data:", data_table(reports), *data_warnings(reports, filters)]), flush=True)
    check_reject_limit(reports, limit)
    return reports
