"""Exam accuracy: multiple-choice items by log-likelihood, short-answer items by greedy decoding.

**Multiple choice** (items with ``choices``; the ``answer`` is the text of the right choice). Each choice ``c``
is scored by the log-likelihood of its answer tokens given the prompt: ``render_prompt(item) + c`` is tokenized
once with offsets and the answer tokens are exactly those :func:`kcpt.data.exam.answer_labels` labels for the
exam loss (a token straddling the prompt/answer boundary — BPE merges the prompt's trailing space into the
choice's first syllable — counts as an answer token). The EOS the exam loss appends is NOT scored: the
log-likelihood is that of the choice text, as lm-evaluation-harness scores a continuation. The prediction is
the choice with the highest score under ``length_norm``:

- ``"chars"`` (default; lm-eval's ``acc_norm``): log-likelihood / ``len(choice)`` characters (lm-eval divides by
  the length of the choice string, without the ``target_delimiter``);
- ``"none"`` (lm-eval's ``acc``): the plain log-likelihood sum;
- ``"tokens"``: log-likelihood / answer tokens.

Ties go to the earliest choice (``argmax``). lm-eval scores the same tokens: its ``_encode_pair`` moves the
context's trailing whitespace into the continuation and takes ``enc(context + continuation)[len(enc(context)):]``
— with ``doc_to_text`` = the rendered prompt (or ``prompt.rstrip()`` with ``target_delimiter: " "``) and
``doc_to_choice`` = the choices, that is this module's answer span: the prompt's trailing whitespace is answer here
too, whether it merges into the choice's first token (as with the demo tokenizer) or is a token of its own (a
newline; the space before digits in Llama-3-style pre-tokenizers).

**Short answer** (no ``choices``). The context is the prompt without its trailing whitespace (the tokens of the
prompt that start before ``len(prompt.rstrip())``): in training the space after ``답:`` is answer (its first token,
or a token of its own), so the model generates it; the exam loss's prompt tokens are exactly this context.
Greedy decoding (KV cache) until EOS or ``max_new_tokens`` (default:
the longest reference answer of the batch in tokens + 8); the decoded text is compared with the reference after
:func:`normalize_answer` — exact match, and character-level F1 (:func:`char_f1`).

Batches: the log-likelihood forwards are right-padded (``attention_mask``), generation is left-padded with
``position_ids`` from the mask. Under a process group every rank must call :func:`score_exam` together (its own
items): the number of forwards and decode steps is made equal over ranks (ZeRO-3 gathers parameters inside every
forward), and :func:`gather_scores` combines the ranks' per-item results.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from kcpt.config import ExamTemplate
from kcpt.data.exam import answer_labels, render_prompt
from kcpt.data.exam_io import normalize_answer
from kcpt.data.types import IGNORE_INDEX, ExamItem
from kcpt.errors import InputError

LengthNorm = Literal["chars", "tokens", "none"]
GEN_EXTRA_TOKENS = 8
"""Default ``max_new_tokens`` = longest reference answer (tokens) + this."""


# --------------------------------------------------------------------------- pure text functions


def exact_match(pred: str, ref: str) -> bool:
    """``pred`` equals ``ref`` after :func:`normalize_answer`."""
    return normalize_answer(pred) == normalize_answer(ref)


def char_f1(pred: str, ref: str) -> float:
    """Character-level F1 of ``pred`` against ``ref``: both normalised, whitespace removed, characters compared as
    multisets (the SQuAD token F1 with Korean syllables as tokens). 1.0 when both are empty, 0.0 when one is."""
    p = [c for c in normalize_answer(pred) if not c.isspace()]
    r = [c for c in normalize_answer(ref) if not c.isspace()]
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- results


@dataclass
class ExamScores:
    accuracy: float | None
    """MC items: fraction whose highest-scoring choice is the answer (None if no MC items)."""
    exact_match: float | None
    """Short-answer items: greedy decode, normalised exact match (None if none)."""
    f1: float | None
    """Short-answer items: mean character-level F1 (None if none)."""
    n_mc: int
    n_short: int
    per_item: list[dict] = field(default_factory=list)
    """``{"id", "kind": "mc"|"short", "correct": bool, "f1": float|None, "pred": str}`` per item, in input order."""


def summarize(per_item: list[dict]) -> ExamScores:
    """:class:`ExamScores` of per-item results (of one rank or gathered from all)."""
    mc = [r for r in per_item if r["kind"] == "mc"]
    short = [r for r in per_item if r["kind"] == "short"]
    return ExamScores(
        accuracy=sum(r["correct"] for r in mc) / len(mc) if mc else None,
        exact_match=sum(r["correct"] for r in short) / len(short) if short else None,
        f1=sum(r["f1"] for r in short) / len(short) if short else None,
        n_mc=len(mc), n_short=len(short), per_item=per_item)


# --------------------------------------------------------------------------- lockstep over ranks


def _lockstep() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _max_over_ranks(n: int, device: torch.device) -> int:
    if not _lockstep():
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _all_done(done: bool, device: torch.device) -> bool:
    if not _lockstep():
        return done
    t = torch.tensor([0 if done else 1], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# --------------------------------------------------------------------------- multiple choice


def choice_sequence(item: ExamItem, choice: str, tokenizer, template: ExamTemplate) -> tuple[list[int], list[int]]:
    """``(ids, answer_mask)`` of ``prompt + choice`` without the exam loss's EOS: the answer positions are those
    :func:`~kcpt.data.exam.answer_labels` labels (so the boundary rule is the exam loss's)."""
    ids, labels = answer_labels(render_prompt(item, template), choice, tokenizer)
    ids, labels = ids[:-1], labels[:-1]  # the appended EOS: not part of the choice text
    return ids, [int(lab != IGNORE_INDEX) for lab in labels]


@torch.no_grad()
def sequence_logliks(model: torch.nn.Module, seqs: Sequence[tuple[list[int], list[int]]], *, pad_id: int,
                     batch_size: int, device: torch.device) -> list[tuple[float, int]]:
    """``(sum of log p(token | prefix), count)`` over the masked positions of each ``(ids, mask)`` (a masked first
    token has no prefix and is not scored). Right-padded batches in length order; under a process group every
    rank runs the same number of forwards (empty ones repeat a sequence and are dropped)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    n_batches = _max_over_ranks(math.ceil(len(order) / batch_size), device)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    for b in range(n_batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        dummy = not idx
        rows = [seqs[i] for i in idx] if idx else [([pad_id, pad_id], [0, 0])]
        width = max(len(ids) for ids, _ in rows)
        ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        msk = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (ids, mask) in enumerate(rows):
            ids_t[r, :len(ids)] = torch.tensor(ids)
            att[r, :len(ids)] = 1
            msk[r, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
        ids_t, att, msk = ids_t.to(device), att.to(device), msk.to(device)
        logits = model(input_ids=ids_t, attention_mask=att, use_cache=False).logits
        m = msk[:, 1:]
        row = torch.arange(len(rows), device=device)[:, None].expand_as(m)[m]
        # float32 log-softmax over the answer positions only (not the whole [B, T, V] logits)
        logp = torch.log_softmax(logits[:, :-1][m].float(), dim=-1)
        tok = logp.gather(-1, ids_t[:, 1:][m][:, None]).squeeze(-1).double()
        sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row, tok).tolist()
        counts = m.sum(-1).tolist()
        if not dummy:
            for r, i in enumerate(idx):
                out[i] = (sums[r], int(counts[r]))
    return out


def _pick(scores: list[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def _score_mc(model, tokenizer, items: list[ExamItem], template: ExamTemplate, *, batch_size: int,
              length_norm: LengthNorm, device: torch.device) -> dict[str, dict]:
    seqs, owner = [], []
    for it in items:
        assert it.choices is not None
        for j, c in enumerate(it.choices):
            seqs.append(choice_sequence(it, c, tokenizer, template))
            owner.append((it, j))
    ll = sequence_logliks(model, seqs, pad_id=_pad_id(tokenizer), batch_size=batch_size, device=device)
    by_item: dict[str, list[float]] = {}
    for (it, j), (s, n) in zip(owner, ll, strict=True):
        if length_norm == "chars":
            v = s / max(1, len(it.choices[j]))
        elif length_norm == "tokens":
            v = s / max(1, n)
        else:
            v = s
        by_item.setdefault(it.id, []).append(v)
    res = {}
    for it in items:
        k = _pick(by_item[it.id])
        pred = it.choices[k]
        res[it.id] = {"id": it.id, "kind": "mc", "correct": k == gold_index(it), "f1": None, "pred": pred}
    return res


def gold_index(item: ExamItem) -> int:
    """Index of the choice equal to the item's answer (NFC, whitespace-collapsed); InputError naming the item's
    file and line when none is."""
    assert item.choices is not None
    want = normalize_answer(item.answer)
    for j, c in enumerate(item.choices):
        if normalize_answer(c) == want:
            return j
    raise InputError(f"exam item '{item.id}': its answer is not one of its choices (the answer of a "
                     "multiple-choice item is the text of the right choice)", path=item.source or None,
                     line=item.line, field="answer")


# --------------------------------------------------------------------------- short answer


def context_ids(prompt: str, tokenizer) -> list[int]:
    """Token ids of ``prompt`` without its trailing whitespace: the tokens that start before
    ``len(prompt.rstrip())`` (tokenized with the prompt's own offsets; special tokens kept)."""
    end = len(prompt.rstrip())
    enc = tokenizer(prompt, add_special_tokens=True, split_special_tokens=True, return_offsets_mapping=True)
    return [tid for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
            if s < end or (s == e == 0)]


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, contexts: Sequence[list[int]], *, eos_id: int, pad_id: int,
                  max_new_tokens: int, batch_size: int, device: torch.device) -> list[list[int]]:
    """Greedy continuation of each context (left-padded batches, KV cache), up to EOS (not returned) or
    ``max_new_tokens``. Under a process group all ranks run the same number of batches and decode steps."""
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    n_batches = _max_over_ranks(math.ceil(len(order) / batch_size), device)
    out: list[list[int]] = [[] for _ in contexts]
    for b in range(n_batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        rows = [contexts[i] for i in idx] if idx else [[eos_id]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ctx in enumerate(rows):
            ids[r, width - len(ctx):] = torch.tensor(ctx)
            att[r, width - len(ctx):] = 1
        ids, att = ids.to(device), att.to(device)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
        gen: list[torch.Tensor] = []
        past = None
        step_ids, step_pos = ids, pos
        for _ in range(max_new_tokens):
            o = model(input_ids=step_ids, attention_mask=att, position_ids=step_pos, past_key_values=past,
                      use_cache=True)
            past = o.past_key_values
            nxt = o.logits[:, -1].argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            gen.append(nxt)
            finished |= nxt == eos_id
            if _all_done(bool(finished.all()), device):
                break
            step_ids = nxt[:, None]
            step_pos = step_pos[:, -1:] + 1
            att = torch.cat([att, torch.ones_like(att[:, :1])], dim=-1)
        if idx:
            toks = torch.stack(gen, dim=1).tolist() if gen else [[] for _ in rows]
            for r, i in enumerate(idx):
                seq = toks[r]
                out[i] = seq[:seq.index(eos_id)] if eos_id in seq else seq
    return out


def _score_short(model, tokenizer, items: list[ExamItem], template: ExamTemplate, *, batch_size: int,
                 max_new_tokens: int | None, device: torch.device) -> dict[str, dict]:
    contexts = [context_ids(render_prompt(it, template), tokenizer) for it in items]
    if max_new_tokens is None:
        longest = max((len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) for it in items), default=0)
        max_new_tokens = _max_over_ranks(longest, device) + GEN_EXTRA_TOKENS
    gens = greedy_decode(model, contexts, eos_id=tokenizer.eos_token_id, pad_id=_pad_id(tokenizer),
                         max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    res = {}
    for it, g in zip(items, gens, strict=True):
        pred = tokenizer.decode(g, skip_special_tokens=True)
        res[it.id] = {"id": it.id, "kind": "short", "correct": exact_match(pred, it.answer),
                      "f1": char_f1(pred, it.answer), "pred": normalize_answer(pred)}
    return res


# --------------------------------------------------------------------------- entry points


def score_exam(model, tokenizer, items: list[ExamItem], template: ExamTemplate, *, device=None, batch_size: int = 8,
               max_new_tokens: int | None = None, length_norm: str = "chars") -> ExamScores:
    """Score ``items`` with ``model`` (see the module docstring for the rules); ``per_item`` in input order.

    ``device``: where the inputs go (default: the model's first parameter's). ``max_new_tokens``: greedy decoding
    limit for short-answer items (default: longest reference answer in tokens + 8, the maximum over ranks).
    ``length_norm``: ``chars`` (default, lm-eval ``acc_norm``), ``tokens`` or ``none`` (lm-eval ``acc``).
    The model is put in eval mode for the call and restored. Under a process group: collective (see above).
    """
    if length_norm not in ("chars", "tokens", "none"):
        raise ValueError(f"length_norm must be 'chars', 'tokens' or 'none', got {length_norm!r}")
    dev = torch.device(device) if device is not None else _device_of(model)
    mc = [it for it in items if it.choices]
    short = [it for it in items if not it.choices]
    check_items(mc)  # a bad item fails before any forward
    was_training = model.training
    model.eval()
    try:
        res = _score_mc(model, tokenizer, mc, template, batch_size=batch_size, length_norm=length_norm,  # type: ignore[arg-type]
                        device=dev)
        res.update(_score_short(model, tokenizer, short, template, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, device=dev))
    finally:
        model.train(was_training)
    return summarize([res[it.id] for it in items])


def check_items(items: list[ExamItem]) -> None:
    """InputError for the first multiple-choice item whose answer is not one of its choices. Call it on the WHOLE
    list on every rank before slicing: one rank raising alone would leave the others waiting in a collective."""
    for it in items:
        if it.choices:
            gold_index(it)


def rank_slice(items: list[Any], rank: int, world: int, max_items: int | None = None) -> list[Any]:
    """This rank's disjoint share of the first ``max_items`` items (all when None): every ``world``-th item."""
    head = items if max_items is None else items[:max_items]
    return head[rank::world]


def gather_scores(local: ExamScores) -> ExamScores:
    """The scores of all ranks' items together (every rank gets them; identity without a process group)."""
    if not _lockstep():
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local.per_item)
    return summarize([r for p in parts for r in p])
