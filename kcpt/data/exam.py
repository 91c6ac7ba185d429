"""Exam items → token segments whose labels cover the answer (and EOS) only.

The prompt is rendered from :class:`~kcpt.config.ExamTemplate` (an item's own ``prompt`` is used verbatim), the
answer is appended, and the WHOLE text is tokenized once with offsets. A token is a prompt token (label -100)
when its character span ends at or before the answer's first character; every other token — including one that
straddles the boundary, as when BPE merges the prompt's trailing space with the answer's first syllable — and
the appended EOS carry their id as label. The answer start therefore never depends on re-tokenizing halves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from kcpt.config import ExamTemplate
from kcpt.data.packing import EncodedSegment
from kcpt.data.types import IGNORE_INDEX, ExamItem
from kcpt.errors import InputError

REASON_TOO_LONG = "answer_truncated"
REASON_TOO_MANY_CHOICES = "too_many_choices"


class ExamTooLong(InputError):
    """The rendered item (prompt + answer + EOS) is longer than ``seq_len`` tokens; it is never cut. ``length``:
    its size in tokens."""

    length: int = 0


class TooManyChoices(InputError):
    """The item has more choices than the template has ``choice_labels``; a counted skip (or an error with
    ``strict``)."""


def render_prompt(item: ExamItem, template: ExamTemplate) -> str:
    """The prompt text of ``item``: its ``prompt`` verbatim, else the template filled with question/choices."""
    if item.prompt is not None:
        return item.prompt
    if item.question is None:
        raise InputError(f"item '{item.id}' has neither 'prompt' nor 'question'", path=item.source or None,
                         line=item.line, field="question")
    if not item.choices:
        return template.prompt.format(question=item.question)
    if len(item.choices) > len(template.choice_labels):
        raise TooManyChoices(f"item '{item.id}' has {len(item.choices)} choices; the template has only "
                             f"{len(template.choice_labels)} choice_labels (add labels to data.template.choice_labels)"
                             f" [{REASON_TOO_MANY_CHOICES}]", path=item.source or None, line=item.line,
                             field="choices")
    choices = template.choice_separator.join(template.choice.format(label=label, text=text)
                                             for label, text in zip(template.choice_labels, item.choices, strict=False))
    return template.prompt_with_choices.format(question=item.question, choices=choices)


def answer_labels(prompt: str, answer: str, tokenizer) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of ``prompt + answer`` + EOS, tokenized once with offsets: a token is a prompt token
    (label -100) when its span starts inside the prompt without its trailing whitespace and ends at or before
    ``len(prompt)``; every other token, and the EOS, is labelled with its id. So the prompt's trailing whitespace
    belongs to the answer whether the tokenizer merges it into the answer's first token (`` 대``) or keeps it as a
    token of its own (a newline, or the space before digits in Llama-3-style pre-tokenizers): the prompt tokens are
    exactly the generation context (:func:`kcpt.eval.exam_scoring.context_ids`, the prompt's tokens that start
    before ``len(prompt.rstrip())``), and every choice is scored after the same context. The one boundary rule of
    the exam loss (and of exam accuracy, :mod:`kcpt.eval.exam_scoring`)."""
    visible, answer_start = len(prompt.rstrip()), len(prompt)
    enc = tokenizer(prompt + answer, add_special_tokens=True, split_special_tokens=True,
                    return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX if (start < visible or start == end == 0) and end <= answer_start else tid
              for tid, (start, end) in zip(ids, enc["offset_mapping"], strict=True)]
    eos = tokenizer.eos_token_id
    if not ids or ids[-1] != eos:
        ids.append(eos)
        labels.append(eos)
    else:  # the tokenizer appended EOS itself (offsets (0, 0)): it is part of the answer
        labels[-1] = eos
    return ids, labels


def encode_exam_item(item: ExamItem, tokenizer, template: ExamTemplate, seq_len: int,
                     source: str = "") -> EncodedSegment:
    """Render, tokenize once with offsets, append EOS; labels -100 on prompt-only tokens.

    Special-token strings inside the item's text are tokenized as plain text (``split_special_tokens``).

    Raises :class:`ExamTooLong` when the result is longer than ``seq_len`` tokens. ``source`` is the dataset
    name the packed row will carry.
    """
    ids, labels = answer_labels(render_prompt(item, template), item.answer, tokenizer)
    if len(ids) > seq_len:
        err = ExamTooLong(f"item '{item.id}': rendered prompt + answer is {len(ids)} tokens > seq_len {seq_len}; "
                          f"raise data.seq_len or shorten the item [{REASON_TOO_LONG}]", path=item.source or None,
                          line=item.line)
        err.length = len(ids)
        raise err
    return EncodedSegment(ids, labels, source)


def encode_exam_items(items: Iterable[ExamItem], tokenizer, template: ExamTemplate, seq_len: int, *, report,
                      strict: bool = False, source: str = "") -> Iterator[EncodedSegment]:
    """Encode a stream of items; an item too long for ``seq_len`` (``answer_truncated``) or with more choices than
    ``choice_labels`` (``too_many_choices``) is a counted skip with a message naming file:line and id or, with
    ``strict``, the raised :class:`ExamTooLong` / :class:`TooManyChoices`."""
    for item in items:
        try:
            seg = encode_exam_item(item, tokenizer, template, seq_len, source)
        except (ExamTooLong, TooManyChoices) as e:
            if strict:
                raise
            if isinstance(e, ExamTooLong):  # its length goes into the manifest: the fix names a seq_len
                report.add(REASON_TOO_LONG, str(e), length=e.length)
            else:
                report.add(REASON_TOO_MANY_CHOICES, str(e))
            continue
        yield seg
