"""Held-out sets that are not held out: training data that holds a held-out set's exam questions or input files.

A stage's held-out sets (``eval_raw``, ``eval_exam``) pick its best checkpoint, stop it and hold the raw bound and
the stage-3 gate. An exam question the model also trains on makes its held-out loss a training loss; the gate then
passes on memory. Each dataset dedups only itself, so nothing caught an item copied into both ``qa_train.jsonl``
and ``exam_val.jsonl``, or a held-out set pointed at a training file.

:func:`held_out_overlap` compares, after preparation, each held-out dataset of the stages with each training source
of the same stages (a dataset that is both is said first):

- **exam questions**: an item of a held-out exam set whose question — its ``prompt``, or its ``question`` with its
  ``choices``; NFC, whitespace runs collapsed, case kept — is also an item's question in a training exam set
  (read from both prepared sets' ``items.jsonl``, the items the rows were encoded from). Answers are not compared:
  a question seen in training is seen, whatever answer it had there;
- **input files**: an input of a held-out set with the same content hash as an input of a training set (raw or
  exam: the manifests' ``inputs[].sha256``; a directory input hashes all its files, so this catches the same file
  or directory named twice, not one file inside another's directory).

Raw documents are not compared one by one (a training corpus is read once, when it is prepared; its rows keep no
per-document text). ``data.held_out_overlap`` says what a finding does: ``warn`` (default; a ``warning:`` line
under the data table naming the count, the first pairs by file and line, and the fix) or ``error`` (an
:class:`~kcpt.errors.InputError` with the same text, before anything trains).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from kcpt.data.exam_io import ITEMS_FILE, normalize_answer, read_items_file
from kcpt.data.shards import read_manifest
from kcpt.data.types import ExamItem

EXAMPLES = 3
"""Pairs named in a warning."""

def question_key(item: ExamItem) -> str:
    """What makes two items the same question: the prompt, or the question and its choices (NFC, whitespace runs
    collapsed to one space, stripped)."""
    parts = [item.prompt] if item.prompt is not None else [item.question or "", *(item.choices or [])]
    return "\x1f".join(normalize_answer(p) for p in parts)


def _where(item: ExamItem) -> str:
    return f"{item.source or '?'} line {item.line}" if item.line is not None else f"{item.source or '?'}"


def _items(directory: Path) -> list[ExamItem]:
    path = directory / ITEMS_FILE
    return read_items_file(path) if path.is_file() else []


def held_out_overlap(local_prepared: Mapping[str, Path], held_out: Iterable[str], training: Iterable[str]
                     ) -> list[str]:
    """One line per (held-out set, training set) pair that shares exam questions or input files (module
    docstring); ``local_prepared``: dataset name → its local prepared directory (manifest and ``items.jsonl``)."""
    train = [t for t in dict.fromkeys(training) if t in local_prepared]
    held = [h for h in dict.fromkeys(held_out) if h in local_prepared and h not in train]
    manifests = {n: read_manifest(local_prepared[n]) for n in [*held, *train]}
    items = {n: _items(local_prepared[n]) for n in [*held, *train] if manifests[n].get("kind") == "exam"}
    keys = {n: {question_key(i): i for i in its} for n, its in items.items()}
    out = [f"{h} is held out (an eval set) and trained on (a source) in the same stages"
           for h in dict.fromkeys(held_out) if h in train]
    for h in held:
        inputs = {i.get("sha256"): i.get("path") for i in manifests[h].get("inputs", []) if i.get("sha256")}
        for t in train:
            same = [(inputs[i["sha256"]], i.get("path")) for i in manifests[t].get("inputs", [])
                    if i.get("sha256") in inputs]
            if same:
                named = "; ".join(f"{a} = {b}" for a, b in same[:EXAMPLES])
                out.append(f"{h} (held out) and {t} (trained on) read the same input "
                           f"{'file' if len(same) == 1 else f'files ({len(same)})'}: {named}")
                continue  # every item of that file is shared too: one line says it
            if h not in keys or t not in keys:
                continue
            shared = [(keys[h][k], keys[t][k]) for k in keys[h] if k in keys[t]]
            if shared:
                pairs = "; ".join(f"{_where(a)} = {_where(b)}" for a, b in shared[:EXAMPLES])
                out.append(f"{h} (held out): {len(shared)} of its {len(items[h])} exam questions are also in "
                           f"{t} (trained on), e.g. {pairs}")
    return out


def overlap_message(lines: list[str]) -> str:
    """The findings with what they mean and what to do (the warning's and the error's text)."""
    return ("; ".join(lines) + ". A held-out loss on what the model trains on is a training loss: best checkpoints, "
            "stops and the gate would judge memory. Remove the shared items from one side (or set "
            "data.held_out_overlap=ignore if that is intended)")
