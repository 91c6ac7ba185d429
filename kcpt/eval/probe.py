"""The fixed probe set of the forgetting / drift report, and its evaluation buckets.

For each probe dataset (``eval.forgetting.datasets``; default: every ``eval_raw`` of the plan) the documents are
read from the dataset's inputs in input order and cleaned, filtered and deduplicated exactly as ``prepare`` does
(the run's ``data`` settings), tokenized one by one with the run's tokenizer (EOS appended, as
:func:`kcpt.data.packing.tokenize_documents`), and taken until ``probe_tokens`` tokens (the document that crosses
the budget is cut there). Each document is chunked to ≤ ``seq_len`` (:func:`~kcpt.data.packing.chunk_document`)
and the chunks are laid into rows in order (first fit) under the packed-row contract of :mod:`kcpt.data.types`:
position ids restart at every chunk, the first token of every chunk has no label. With a budget that covers a
whole dataset the probe scores the same tokens as the run's raw val loss on it.

The probe is built from the raw documents, not from the prepared rows: packed rows keep no per-document identity,
and bucket settings can change without preparing anything again. ``sha256`` (token ids, positions, labels,
per-token document index and every document's bucket labels) identifies the probe: two reports with the same hash
scored the same tokens in the same buckets.

Buckets (``eval.buckets``): every document has one label per bucket kind — ``all``; ``source`` (the probe
dataset); ``length`` (band of the whole document's length in tokens, EOS included); and one kind per configured
field bucket (the raw record's field value, or its ``pattern`` match; ``(missing)`` when absent or null,
``(no match)`` when the pattern does not match). Within a kind the buckets partition the probe set.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kcpt.config import BucketsConfig, KcptConfig
from kcpt.data.types import IGNORE_INDEX
from kcpt.errors import ConfigError
from kcpt.train.batches import PackedRows

MISSING = "(missing)"
NO_MATCH = "(no match)"


def band_labels(edges: Sequence[int]) -> list[str]:
    """Labels of the length bands cut at ``edges``: ``[256, 1024]`` → ``<256``, ``256-1023``, ``>=1024``."""
    if not edges:
        return []
    out = [f"<{edges[0]}"]
    out += [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:], strict=False)]
    return out + [f">={edges[-1]}"]


def length_band(n_tokens: int, edges: Sequence[int]) -> str:
    return band_labels(edges)[int(np.searchsorted(np.asarray(edges), n_tokens, side="right"))]


def _value_label(v: Any) -> str:
    if v is None:
        return MISSING
    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)[:80]


def field_label(meta: dict[str, Any], name: str, pattern: str | None) -> str:
    """The bucket of a document for a field bucket (see the module docstring)."""
    if name not in meta or meta[name] is None:
        return MISSING
    value = _value_label(meta[name])
    if pattern is None:
        return value
    m = re.search(pattern, value)
    if m is None:
        return NO_MATCH
    return m.group(1) if m.re.groups else m.group(0)


def bucket_kinds(buckets: BucketsConfig) -> list[str]:
    """Bucket kinds in report order: ``all``, ``source``, ``length``, then the field buckets."""
    return ["all", *(["source"] if buckets.source else []), *(["length"] if buckets.length_bands else []),
            *buckets.fields]


def doc_buckets(dataset: str, n_tokens: int, meta: dict[str, Any], buckets: BucketsConfig) -> dict[str, str]:
    """Bucket kind → label of one document."""
    out = {"all": "all"}
    if buckets.source:
        out["source"] = dataset
    if buckets.length_bands:
        out["length"] = length_band(n_tokens, buckets.length_bands)
    for name, fb in buckets.fields.items():
        out[name] = field_label(meta, fb.field, fb.pattern)
    return out


@dataclass
class ProbeSet:
    """Probe rows, the document each scored token belongs to, and the documents with their buckets."""

    rows: PackedRows
    doc_of: np.ndarray
    """int32 [R, T]: index into ``docs`` of the token at each position that has a label; -1 elsewhere."""
    docs: list[dict[str, Any]]
    """Per document: ``dataset``, ``doc_id``, ``length`` (whole document, tokens), ``tokens`` (taken into the
    probe), ``buckets`` (kind → label)."""
    kinds: list[str]
    datasets: list[str]
    probe_tokens: int
    sha256: str = ""
    meta_fields: list[str] = field(default_factory=list)

    @property
    def scored_tokens(self) -> int:
        return int((self.doc_of >= 0).sum())

    def describe(self) -> dict[str, Any]:
        return {"datasets": self.datasets, "probe_tokens": self.probe_tokens, "documents": len(self.docs),
                "rows": len(self.rows), "seq_len": self.rows.seq_len, "scored_tokens": self.scored_tokens,
                "sha256": self.sha256}


def probe_datasets(cfg: KcptConfig) -> list[str]:
    """``eval.forgetting.datasets``, or every ``eval_raw`` of the plan (distinct, plan order)."""
    names = cfg.eval.forgetting.datasets
    if names is None:
        names = list(dict.fromkeys(st.eval_raw for st in cfg.plan))
    if not names:
        raise ConfigError("eval.forgetting.datasets: no probe dataset (and the plan has no eval_raw)")
    for n in names:
        if cfg.data.datasets[n].kind != "raw":
            raise ConfigError(f"eval.forgetting.datasets: '{n}' is an exam dataset; the probe set is raw text")
    return names


def _documents(cfg: KcptConfig, name: str, meta_fields: list[str]) -> Iterator[Any]:
    from kcpt.data.cleaning import clean_documents
    from kcpt.data.demo import resolve_inputs
    from kcpt.data.rejects import RejectReport
    from kcpt.data.sources import read_documents

    ds, data = cfg.data.datasets[name], cfg.data
    report = RejectReport()
    docs = read_documents(resolve_inputs(ds.inputs), text_field=ds.text_field, report=report, strict=False,
                          max_line_chars=data.filters.max_line_chars, txt_split=data.txt_split,
                          meta_fields=meta_fields)
    return clean_documents(docs, data.filters, report)


def _doc_ids(text: str, tokenizer: Any) -> list[int]:
    """A document's token ids as prepare makes them (EOS appended), whole."""
    from kcpt.data.packing import tokenize_documents

    (seg,) = tokenize_documents([text], tokenizer, 1 << 62)
    return list(seg.input_ids)


def build_probe(cfg: KcptConfig, tokenizer: Any, *, probe_tokens: int | None = None) -> ProbeSet:
    """The probe set of ``cfg`` (datasets, budget and buckets from ``cfg.eval``; ``probe_tokens`` overrides the
    budget per dataset) tokenized with ``tokenizer``."""
    from kcpt.data.packing import chunk_document
    from kcpt.model.tokenizer import pad_token_id

    budget = probe_tokens if probe_tokens is not None else cfg.eval.forgetting.probe_tokens
    if budget < 1:
        raise ConfigError(f"probe tokens must be ≥ 1, got {budget}")
    buckets, seq_len = cfg.eval.buckets, cfg.data.seq_len
    names = probe_datasets(cfg)
    fields = list(dict.fromkeys(fb.field for fb in buckets.fields.values()))
    docs: list[dict[str, Any]] = []
    chunks: list[tuple[int, Sequence[int]]] = []
    for name in names:
        taken = 0
        for doc in _documents(cfg, name, fields):
            if taken >= budget:
                break
            ids = _doc_ids(doc.text, tokenizer)
            keep = ids[: budget - taken]
            taken += len(keep)
            d = len(docs)
            docs.append({"dataset": name, "doc_id": doc.doc_id, "length": len(ids), "tokens": len(keep),
                         "buckets": doc_buckets(name, len(ids), doc.meta, buckets)})
            chunks += [(d, seg.input_ids) for seg in chunk_document(keep, seq_len)]
    if not docs:
        raise ConfigError(f"eval.forgetting: the probe datasets {names} hold no document after cleaning")
    rows, doc_of = _lay_out(chunks, seq_len, pad_token_id(tokenizer))
    probe = ProbeSet(rows=rows, doc_of=doc_of, docs=docs, kinds=bucket_kinds(buckets), datasets=names,
                     probe_tokens=budget, meta_fields=fields)
    probe.sha256 = _probe_sha256(probe)
    return probe


def _lay_out(chunks: list[tuple[int, Sequence[int]]], seq_len: int, pad_id: int) -> tuple[PackedRows, np.ndarray]:
    """Chunks → rows, each chunk into the first row with room for it (first fit, in order: deterministic, and
    rows hold several documents as prepared rows do), with the document of every label."""
    starts: list[list[tuple[int, Sequence[int]]]] = []
    fill: list[int] = []
    open_rows: list[int] = []
    for d, ids in chunks:
        r = next((r for r in open_rows if fill[r] + len(ids) <= seq_len), None)
        if r is None:
            r = len(starts)
            starts.append([])
            fill.append(0)
            open_rows.append(r)
        starts[r].append((d, ids))
        fill[r] += len(ids)
        if fill[r] == seq_len:
            open_rows.remove(r)
    n = len(starts)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32)
    position_ids = np.zeros((n, seq_len), dtype=np.int32)
    doc_of = np.full((n, seq_len), -1, dtype=np.int32)
    for r, members in enumerate(starts):
        at = 0
        for d, ids in members:
            k = len(ids)
            input_ids[r, at:at + k] = ids
            labels[r, at + 1:at + k] = ids[1:]
            position_ids[r, at:at + k] = np.arange(k)
            doc_of[r, at + 1:at + k] = d
            at += k
        last = int(position_ids[r, at - 1]) + 1 if at else 0
        position_ids[r, at:] = np.arange(last, last + seq_len - at)  # padding continues the last count
    return PackedRows("probe", input_ids, position_ids, labels), doc_of


def _probe_sha256(p: ProbeSet) -> str:
    h = hashlib.sha256()
    for a in (p.rows.input_ids, p.rows.position_ids, p.rows.labels, p.doc_of):
        h.update(np.ascontiguousarray(a, dtype=np.int32).tobytes())
    h.update(json.dumps([[d["dataset"], d["buckets"]] for d in p.docs], sort_keys=True,
                        ensure_ascii=False).encode())
    return h.hexdigest()
