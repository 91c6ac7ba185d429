"""Korean tokenizer audit and vocabulary expansion with folded embedding init.

Audit: how well a tokenizer covers Korean text — tokens per Hangul syllable, characters per token, how many
tokens are partial UTF-8 bytes (a Hangul syllable is 3 bytes in UTF-8, so a byte-level BPE that never merged it
spends up to 3 tokens on it), and the words it fragments most.

Expansion: add the most frequent fragmented Korean words as new tokens and initialise each new embedding row as
the mean of the rows of the tokens the old tokenizer split it into ("folded" init), so the expanded model starts
out predicting the same distribution it did before, instead of from random rows.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kcpt.errors import InputError

_HANGUL_SYLLABLE = re.compile(r"[\uac00-\ud7a3]")
_KOREAN_WORD = re.compile(r"[\uac00-\ud7a3]{2,}")


@dataclass
class AuditReport:
    """Coverage statistics of one tokenizer on one text sample. Words are counted where they stand in the text (the
    tokens of each whole text that overlap the word, a space-only token such as a lone ``▁`` left out), not encoded
    alone: alone, a byte-level BPE shows a word's bare form where text mostly has its leading-space form (``Ġ또는``,
    one token), and a Metaspace tokenizer prefixes a ``▁`` token of its own."""

    texts: int
    chars: int
    tokens: int
    hangul_syllables: int
    chars_per_token: float
    tokens_per_hangul_syllable: float
    """Over Korean words only (runs of ≥2 syllables); 1.0 means one token per syllable, < 1 means merges."""
    partial_byte_token_share: float
    """Share of tokens that do not decode to whole characters on their own (byte fallback pieces)."""
    single_token_syllable_share: float
    """Share of distinct Hangul syllables in the sample that the tokenizer encodes as exactly one token (a
    space-only token left out)."""
    most_fragmented: list[tuple[str, int, int]] = field(default_factory=list)
    """(word, frequency, tokens) for frequent Korean words split into the most tokens (tokens: the most frequent
    count over the word's occurrences)."""
    unknown_token_share: float = 0.0
    """Share of tokens that are the unknown token (a tokenizer without byte fallback: that text is lost)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        rows = [
            ("texts", f"{self.texts}"), ("characters", f"{self.chars}"), ("tokens", f"{self.tokens}"),
            ("chars / token", f"{self.chars_per_token:.2f}"),
            ("tokens / Hangul syllable (Korean words)", f"{self.tokens_per_hangul_syllable:.2f}"),
            ("partial-byte tokens", f"{self.partial_byte_token_share:.1%}"),
            ("unknown tokens", f"{self.unknown_token_share:.1%}"),
            ("syllables that are one token", f"{self.single_token_syllable_share:.1%}"),
        ]
        width = max(len(k) for k, _ in rows)
        out = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.most_fragmented:
            out.append("most fragmented frequent Korean words (word, count, tokens):")
            out += [f"  {w}\t{c}\t{n}" for w, c, n in self.most_fragmented]
        return "\n".join(out)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Pieces:
    """Per-id facts of a tokenizer, decoded once: whether a token is space only, or a partial UTF-8 byte."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def text(self, tid: int) -> str:
        if tid not in self._text:
            self._text[tid] = self.tokenizer.decode([tid])
        return self._text[tid]

    def space_only(self, tid: int) -> bool:
        return not self.text(tid).strip()


@dataclass
class WordCounts:
    """Korean words of a sample and their token counts in context."""

    tokens: dict[str, Counter[int]] = field(default_factory=dict)
    """word → {tokens it took: occurrences}."""

    @property
    def words(self) -> Counter[str]:
        """word → occurrences."""
        return Counter({w: sum(c.values()) for w, c in self.tokens.items()})

    def typical(self, word: str) -> int:
        return self.tokens[word].most_common(1)[0][0]

    def total(self, word: str) -> int:
        return sum(n * c for n, c in self.tokens[word].items())


def _count_in_context(pieces: _Pieces, text: str, ids: list[int], offsets: list[tuple[int, int]],
                      into: WordCounts) -> None:
    """Add ``text``'s Korean words with the number of its tokens (``ids`` / ``offsets``) overlapping each."""
    spans = sorted((s, e) for tid, (s, e) in zip(ids, offsets, strict=True) if e > s and not pieces.space_only(tid))
    starts = [s for s, _ in spans]
    for m in _KOREAN_WORD.finditer(text):
        lo = bisect.bisect_left(starts, m.start())
        while lo > 0 and spans[lo - 1][1] > m.start():  # tokens begun before the word that reach into it (a
            lo -= 1                                      # byte-level ' ' + the first byte of its first syllable)
        n = 0
        for s, e in spans[lo:]:
            if s >= m.end():
                break
            n += e > m.start()
        into.tokens.setdefault(m.group(), Counter())[max(n, 1)] += 1


def _word_counts(tokenizer: Any, texts: Iterable[str]) -> WordCounts:
    pieces, out = _Pieces(tokenizer), WordCounts()
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        _count_in_context(pieces, text, list(enc["input_ids"]), list(enc["offset_mapping"]), out)
    return out


def audit_tokenizer(tokenizer: Any, texts: Iterable[str], *, top_k: int = 20,
                    word_counts: WordCounts | None = None) -> AuditReport:
    """Measure Korean coverage of ``tokenizer`` (any fast HF tokenizer) on ``texts``. ``word_counts``: an empty
    :class:`WordCounts` to fill with the sample's words (for :func:`propose_korean_tokens`: one pass over the
    corpus serves both)."""
    n_texts = n_chars = n_tokens = n_partial = n_unk = 0
    pieces, counts = _Pieces(tokenizer), word_counts if word_counts is not None else WordCounts()
    if counts.tokens:
        raise ValueError("audit_tokenizer: word_counts must be empty (it is filled with this sample's words)")
    syllables: set[str] = set()
    unk = getattr(tokenizer, "unk_token_id", None)
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        n_texts += 1
        n_chars += len(text)
        n_tokens += len(ids)
        n_partial += sum("\ufffd" in pieces.text(i) for i in ids)
        n_unk += sum(i == unk for i in ids) if unk is not None else 0
        _count_in_context(pieces, text, ids, list(enc["offset_mapping"]), counts)
        syllables.update(_HANGUL_SYLLABLE.findall(text))
    words = counts.words
    syl_in_words = sum(len(w) * c for w, c in words.items())
    tok_in_words = sum(counts.total(w) for w in words)
    single = sum(len([i for i in _encode(tokenizer, s) if not pieces.space_only(i)]) == 1 for s in syllables)
    frag = sorted(words, key=lambda w: (-(counts.total(w) - words[w]), w))[:top_k]
    return AuditReport(
        texts=n_texts, chars=n_chars, tokens=n_tokens,
        hangul_syllables=sum(len(_HANGUL_SYLLABLE.findall(w)) * c for w, c in words.items()),
        chars_per_token=n_chars / max(n_tokens, 1),
        tokens_per_hangul_syllable=tok_in_words / max(syl_in_words, 1),
        partial_byte_token_share=n_partial / max(n_tokens, 1),
        single_token_syllable_share=single / max(len(syllables), 1),
        most_fragmented=[(w, words[w], counts.typical(w)) for w in frag if counts.typical(w) > 1],
        unknown_token_share=n_unk / max(n_tokens, 1),
    )


def propose_korean_tokens(tokenizer: Any, texts: Iterable[str] | None = None, *, counts: WordCounts | None = None,
                          max_new: int = 256, min_count: int = 3, min_tokens: int = 3) -> list[str]:
    """Frequent Korean words (≥ ``min_count`` occurrences) that ``tokenizer`` splits into ≥ ``min_tokens``
    tokens where they stand in the text (their most frequent count), ranked by tokens saved there (Σ over the
    occurrences of tokens − 1); words already in the vocabulary are skipped. From ``texts``, or from the ``counts``
    :func:`audit_tokenizer` filled for this tokenizer (the corpus is not tokenized again)."""
    if (texts is None) == (counts is None):
        raise ValueError("propose_korean_tokens: give texts or counts, one of them")
    counts = counts if counts is not None else _word_counts(tokenizer, texts or [])
    vocab = tokenizer.get_vocab()
    scored = []
    for w, c in counts.words.items():
        if c < min_count or w in vocab:
            continue
        if counts.typical(w) >= min_tokens:
            scored.append((-(counts.total(w) - c), w))
    return [w for _, w in sorted(scored)[:max_new]]


def expansion_problem(tokenizer: Any) -> str | None:
    """Why :func:`expand_vocabulary` cannot grow ``tokenizer`` (its model is not BPE), or None."""
    kind = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("type")
    if kind != "BPE":
        return (f"vocabulary expansion needs a BPE tokenizer (this one is {kind}); use tokenizer.add_tokens for "
                "other models")
    return None


def expand_vocabulary(tokenizer: Any, words: Sequence[str]) -> tuple[Any, dict[str, list[int]]]:
    """A copy of a BPE ``tokenizer`` in which each of ``words`` becomes ONE token where it stands in text, as the
    base tokenizer places it: in its leading-space form (``Ġ…`` for byte-level BPE, ``▁…`` for Metaspace) and in
    its bare form (start of a line), through real vocabulary entries and merges — not added tokens, which would
    split the space off as a token of its own (``텍스트를 클릭합니다`` → ``['텍스트를', 'Ġ', '클릭합니다']``).

    For each form the model's tokens ``p1 … pn`` are chained by merges ``(p1, p2)``, ``(p1p2, p3)``, … appended
    after every existing merge, so all original merges still apply first and then the chain rebuilds the word;
    the intermediate tokens ``p1p2``, ``p1p2p3`` … become vocabulary entries too (a chain can cut into a word
    added before it: that word is chained again from its new pieces, until every word is whole). Returns
    ``(new tokenizer, {new token: ids of its pieces in the ORIGINAL tokenizer})`` in id order (the folded init of
    :func:`expand_tokenizer_and_model`). Words the base already keeps whole, or that pre-tokenize into several
    pieces, add nothing. ``ValueError`` for a tokenizer whose model is not BPE."""
    import tempfile

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    original = tokenizer.backend_tokenizer
    data = json.loads(original.to_str())
    model = data["model"]
    problem = expansion_problem(tokenizer)
    if problem:
        raise ValueError(problem)
    vocab: dict[str, int] = model["vocab"]
    # added tokens past the vocabulary (Llama-3's, Qwen2's specials: 128000…) become vocabulary entries at their own
    # ids: tokenizers numbers an added token missing from the vocabulary after the vocabulary's entries, so the new
    # words would push them onto the ids the new words take (EOS = a Korean word)
    specials = {a["content"]: a["id"] for a in data.get("added_tokens", [])}
    for content, tid in specials.items():
        if content not in vocab and tid not in set(vocab.values()):
            vocab[content] = tid
    old_vocab = dict(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    known = set(merges)
    next_id = max([*vocab.values(), *(t["id"] for t in data.get("added_tokens", [])), len(tokenizer) - 1]) + 1
    forms = []
    for word in words:
        for form in (" " + word, word):
            text = original.normalizer.normalize_str(form) if original.normalizer is not None else form
            pre = original.pre_tokenizer.pre_tokenize_str(text) if original.pre_tokenizer is not None else [(text, 0)]
            if len(pre) == 1 and pre[0][0] not in vocab:
                forms.append(pre[0][0])
    added: dict[str, list[int]] = {}
    current = original
    if model.get("byte_fallback"):
        # Llama-2 / Mistral style: a character missing from the vocabulary becomes byte pieces (<0xEC> …) that
        # ByteFallback decodes one at a time; chained, they would make tokens like <0xEC><0x95> that decode as that
        # text. So each missing character becomes a vocabulary entry first (the model looks a character up before
        # falling back to bytes: no merge needed), initialised from its byte pieces; the chains then join characters
        for ch in dict.fromkeys(ch for f in forms for ch in f):
            if ch not in vocab:
                vocab[ch] = next_id
                next_id += 1
                added[ch] = [old_vocab[t.value] for t in original.model.tokenize(ch)]
        current = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    for _ in range(8):  # chains appended for one word can cut into another's: repeat on what is not whole yet
        pending = [(f, [t.value for t in current.model.tokenize(f)]) for f in forms]
        pending = [(f, pieces) for f, pieces in pending if len(pieces) > 1]
        if not pending:
            break
        for _, pieces in pending:
            cur = pieces[0]
            for nxt in pieces[1:]:
                joined = cur + nxt
                if (cur, nxt) not in known:
                    merges.append((cur, nxt))
                    known.add((cur, nxt))
                if joined not in vocab:
                    vocab[joined] = next_id
                    next_id += 1
                    added[joined] = [old_vocab[t.value] for t in original.model.tokenize(joined)]
                cur = joined
        model["merges"] = [list(m) for m in merges]
        current = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    else:
        raise RuntimeError("vocabulary expansion did not converge: a word still splits after 8 rounds of merges")
    if not added:
        return tokenizer, {}
    with tempfile.TemporaryDirectory(prefix="kcpt-tok-") as d:
        tokenizer.save_pretrained(d)
        (Path(d) / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        new_tok = AutoTokenizer.from_pretrained(d)
    moved = {c: (tid, new_tok.convert_tokens_to_ids(c)) for c, tid in specials.items()
             if new_tok.convert_tokens_to_ids(c) != tid}
    if moved:  # never hand on a tokenizer whose EOS/BOS/pad ids changed under the model
        raise RuntimeError(f"vocabulary expansion moved added tokens (token: (old id, new id)): {moved}")
    return new_tok, dict(sorted(added.items(), key=lambda kv: vocab[kv[0]]))


def expand_tokenizer_and_model(tokenizer: Any, model: Any, new_tokens: Sequence[str]
                               ) -> tuple[Any, dict[str, list[int]]]:
    """:func:`expand_vocabulary` + grow ``model``'s embeddings with folded init; returns the new tokenizer and
    ``{token: old_ids}``.

    Each new input-embedding row (and output row when the head is not tied) is the mean of the rows of the
    tokens the ORIGINAL tokenizer produced for that string. Words already kept whole add nothing. A model with
    more rows than the tokenizer has tokens (padded) keeps them, the new tokens taking the unused rows first; one
    with fewer is refused (InputError).
    """
    old_size = len(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < old_size:
        raise InputError(f"the model has {rows} embedding rows and the tokenizer {old_size} tokens: they do not belong "
                         "together (ids from the tokenizer would index past the model's embeddings); give the model's "
                         "own tokenizer")
    new_tok, pieces = expand_vocabulary(tokenizer, new_tokens)
    if not pieces:
        return tokenizer, {}
    # a model padded past its tokenizer (rows > tokens, e.g. to a multiple of 64) keeps its rows: the new tokens
    # take the unused ones first; grown past them, it stays padded to the same multiple (the largest power of two
    # up to 64 its rows were a multiple of)
    multiple = next((m for m in (64, 32, 16, 8) if rows % m == 0), None) if rows > old_size else None
    if len(new_tok) > rows:
        model.resize_token_embeddings(len(new_tok), pad_to_multiple_of=multiple, mean_resizing=False)
    emb_in = model.get_input_embeddings().weight
    emb_out = model.get_output_embeddings()
    tied = emb_out is None or emb_out.weight.data_ptr() == emb_in.data_ptr()
    with torch.no_grad():
        for tok, old_ids in pieces.items():
            new_id = new_tok.convert_tokens_to_ids(tok)
            if new_id < old_size:
                raise ValueError(f"token {tok!r} got id {new_id} inside the old vocabulary ({old_size})")
            idx = torch.tensor(old_ids)
            emb_in[new_id] = emb_in[idx].mean(dim=0)
            if not tied:
                emb_out.weight[new_id] = emb_out.weight[idx].mean(dim=0)
            if getattr(emb_out, "bias", None) is not None:  # an output bias (Phi) folds like the rows
                emb_out.bias[new_id] = emb_out.bias[idx].mean()
    return new_tok, pieces
