"""Korean tokenizer audit and vocabulary expansion with folded embedding init.

Audit: how well a tokenizer covers Korean text — tokens per Hangul syllable, characters per token, how many
tokens are partial UTF-8 bytes (a Hangul syllable is 3 bytes in UTF-8, so a byte-level BPE that never merged it
spends up to 3 tokens on it), and the words it fragments most.

Expansion: add the most frequent fragmented Korean words as new tokens and initialise each new embedding row as
the mean of the rows of the tokens the old tokenizer split it into ("folded" init), so the expanded model starts
out predicting the same distribution it did before, instead of from random rows.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

_HANGUL_SYLLABLE = re.compile(r"[\uac00-\ud7a3]")
_KOREAN_WORD = re.compile(r"[\uac00-\ud7a3]{2,}")


@dataclass
class AuditReport:
    """Coverage statistics of one tokenizer on one text sample."""

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
    """Share of distinct Hangul syllables in the sample that the tokenizer encodes as exactly one token."""
    most_fragmented: list[tuple[str, int, int]] = field(default_factory=list)
    """(word, frequency, tokens) for frequent Korean words split into the most tokens."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        rows = [
            ("texts", f"{self.texts}"), ("characters", f"{self.chars}"), ("tokens", f"{self.tokens}"),
            ("chars / token", f"{self.chars_per_token:.2f}"),
            ("tokens / Hangul syllable (Korean words)", f"{self.tokens_per_hangul_syllable:.2f}"),
            ("partial-byte tokens", f"{self.partial_byte_token_share:.1%}"),
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


def audit_tokenizer(tokenizer: Any, texts: Iterable[str], *, top_k: int = 20) -> AuditReport:
    """Measure Korean coverage of ``tokenizer`` (any HF tokenizer) on ``texts``."""
    n_texts = n_chars = n_tokens = n_partial = 0
    words: Counter[str] = Counter()
    syllables: set[str] = set()
    for text in texts:
        ids = _encode(tokenizer, text)
        n_texts += 1
        n_chars += len(text)
        n_tokens += len(ids)
        n_partial += sum("\ufffd" in tokenizer.decode([i]) for i in ids)
        words.update(_KOREAN_WORD.findall(text))
        syllables.update(_HANGUL_SYLLABLE.findall(text))
    word_tokens = {w: len(_encode(tokenizer, w)) for w in words}
    syl_in_words = sum(len(w) * c for w, c in words.items())
    tok_in_words = sum(word_tokens[w] * c for w, c in words.items())
    single = sum(len(_encode(tokenizer, s)) == 1 for s in syllables)
    frag = sorted(words, key=lambda w: (-(word_tokens[w] - 1) * words[w], w))[:top_k]
    return AuditReport(
        texts=n_texts, chars=n_chars, tokens=n_tokens,
        hangul_syllables=sum(len(_HANGUL_SYLLABLE.findall(w)) * c for w, c in words.items()),
        chars_per_token=n_chars / max(n_tokens, 1),
        tokens_per_hangul_syllable=tok_in_words / max(syl_in_words, 1),
        partial_byte_token_share=n_partial / max(n_tokens, 1),
        single_token_syllable_share=single / max(len(syllables), 1),
        most_fragmented=[(w, words[w], word_tokens[w]) for w in frag if word_tokens[w] > 1],
    )


def propose_korean_tokens(tokenizer: Any, texts: Iterable[str], *, max_new: int = 256, min_count: int = 3,
                          min_tokens: int = 3) -> list[str]:
    """Frequent Korean words (≥ ``min_count`` occurrences) that ``tokenizer`` splits into ≥ ``min_tokens``
    tokens, ranked by tokens saved (count × (tokens − 1)); words already in the vocabulary are skipped."""
    words: Counter[str] = Counter()
    for text in texts:
        words.update(_KOREAN_WORD.findall(text))
    vocab = tokenizer.get_vocab()
    scored = []
    for w, c in words.items():
        if c < min_count or w in vocab:
            continue
        n = len(_encode(tokenizer, w))
        if n >= min_tokens:
            scored.append((-(c * (n - 1)), w))
    return [w for _, w in sorted(scored)[:max_new]]


def expand_tokenizer_and_model(tokenizer: Any, model: Any, new_tokens: Sequence[str]) -> dict[str, list[int]]:
    """Add ``new_tokens`` to ``tokenizer`` (in place) and grow ``model``'s embeddings with folded init.

    Each new input-embedding row (and output row when the head is not tied) is the mean of the rows of the
    tokens the ORIGINAL tokenizer produced for that string. Returns ``{token: old_ids}``. Tokens already known
    are skipped.
    """
    pieces = {t: _encode(tokenizer, t) for t in new_tokens if t not in tokenizer.get_vocab()}
    if not pieces:
        return {}
    old_size = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_tokens(list(pieces))
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb_in = model.get_input_embeddings().weight
    emb_out = model.get_output_embeddings()
    tied = emb_out is None or emb_out.weight.data_ptr() == emb_in.data_ptr()
    with torch.no_grad():
        for tok, old_ids in pieces.items():
            new_id = tokenizer.convert_tokens_to_ids(tok)
            if new_id < old_size:
                raise ValueError(f"token {tok!r} got id {new_id} inside the old vocabulary ({old_size})")
            idx = torch.tensor(old_ids)
            emb_in[new_id] = emb_in[idx].mean(dim=0)
            if not tied:
                emb_out.weight[new_id] = emb_out.weight[idx].mean(dim=0)
    return pieces
