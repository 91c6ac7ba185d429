"""Records that flow through the data pipeline, and the packed-row schema shared with training.

A packed row has exactly ``seq_len`` positions:

- ``input_ids``    int32[seq_len]: tokens; padding uses the tokenizer's pad id.
- ``position_ids`` int32[seq_len]: restart at 0 at every document (or chunk) start; padding continues the
  count of the last segment (it is never attended to by a real token because it comes last).
- ``labels``       int32[seq_len]: the token to predict is taken by the model's shift (labels[i] is compared
  with the prediction from position i-1). -100 = no loss: padding, exam prompt tokens, and the first token of
  every document/chunk (so no token is asked to predict the first token of another document).
- ``source``       str: the dataset name the row came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

IGNORE_INDEX = -100

ROW_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("source", pa.string()),
])


@dataclass
class Document:
    """One raw document after reading (``text`` not yet cleaned)."""

    text: str
    source: str
    """Input file path."""
    doc_id: str
    """Stable id within the input, e.g. ``constitution.txt#3`` or ``data.jsonl:17``."""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExamItem:
    """One exam record: ``prompt`` is either given or rendered from ``question`` (+ ``choices``)."""

    id: str
    answer: str
    kind: str
    """``qa`` or ``example``."""
    prompt: str | None = None
    question: str | None = None
    choices: list[str] | None = None
    source: str = ""
    line: int | None = None
