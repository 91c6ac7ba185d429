"""Packing: exact row length, no token dropped, segments whole, position restarts, -100 rules, best fit."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np

from kcpt.data.packing import (
    PackStats,
    Segment,
    best_fit_decreasing,
    check_row,
    chunk_document,
    pack_segments,
    tokenize_documents,
)
from kcpt.data.types import IGNORE_INDEX
from kcpt.model.tokenizer import train_bpe_tokenizer

PAD = 1


def _segments(rng: random.Random, n: int, max_len: int) -> list[Segment]:
    segs = []
    for k in range(n):
        ids = [rng.randrange(2, 500) for _ in range(rng.randint(1, max_len))]
        labels = [IGNORE_INDEX if (k % 3 == 0 and i < len(ids) // 2) else t for i, t in enumerate(ids)]  # some "exam"
        segs.append(Segment(ids, labels, "ds"))
    return segs



def test_rows_are_valid_and_keep_every_segment_whole():
    rng = random.Random(0)
    seq_len = 64
    segs = _segments(rng, 300, seq_len)
    stats = PackStats(seq_len)
    rows = list(pack_segments(segs, seq_len, PAD, window=50, stats=stats))
    assert stats.rows == len(rows) and stats.segments == len(segs)
    got = Counter()
    for r in rows:
        assert r.input_ids.shape == r.labels.shape == r.position_ids.shape == (seq_len,)
        assert r.input_ids.dtype == np.int32
        assert check_row(r.input_ids, r.position_ids, r.labels, seq_len) == []
        assert (r.input_ids[r.length:] == PAD).all() and (r.labels[r.length:] == IGNORE_INDEX).all()
        got.update(r.input_ids[:r.length].tolist())
    assert got == Counter(t for s in segs for t in s.input_ids)  # nothing dropped, nothing invented
    assert stats.tokens == sum(len(s) for s in segs)
    assert stats.efficiency == stats.tokens / (len(rows) * seq_len)

    # each segment is contiguous in one row, starting at a position-0 and keeping its labels (first one masked)
    by_first = {}
    for r in rows:
        starts = list(np.nonzero(r.position_ids[:r.length] == 0)[0]) + [r.length]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            by_first.setdefault(tuple(r.input_ids[a:b].tolist()), []).append(r.labels[a:b].tolist())
    for s in segs:
        labels = by_first[tuple(s.input_ids)].pop()
        assert labels == [IGNORE_INDEX, *s.labels[1:]]


def test_best_fit_decreasing_packs_complementary_lengths_perfectly():
    lengths = [60, 4, 50, 14, 33, 31, 64, 10, 54]
    bins = best_fit_decreasing(lengths, 64)
    assert sorted(sorted(lengths[i] for i in b) for b in bins) == [[4, 60], [10, 54], [14, 50], [31, 33], [64]]
    rows = list(pack_segments([Segment([5] * n, [5] * n) for n in lengths], 64, PAD))
    assert len(rows) == 5 and all(r.length == 64 for r in rows)


def test_long_document_is_chunked_without_dropping_tokens():
    texts = ["대한민국 헌법 " * 200, "짧은 문서."]
    tok = train_bpe_tokenizer(texts, 300)
    segs = tokenize_documents(texts, tok, 32, "raw")
    ids0 = tok(texts[0])["input_ids"] + [tok.eos_token_id]
    n0 = -(-len(ids0) // 32)
    assert [t for s in segs[:n0] for t in s.input_ids] == ids0
    assert all(len(s) <= 32 for s in segs)
    assert segs[-1].input_ids[-1] == tok.eos_token_id and len(segs) == n0 + 1
    assert len(chunk_document(list(range(64)), 32)) == 2


def test_padding_position_ids_continue_and_labels_masked():
    rows = list(pack_segments([Segment([7, 8, 9], [7, 8, 9])], 6, PAD))
    (r,) = rows
    assert r.input_ids.tolist() == [7, 8, 9, PAD, PAD, PAD]
    assert r.position_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert r.labels.tolist() == [IGNORE_INDEX, 8, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_long_document_tails_fill_gaps_and_short_documents_stay_whole():
    rng = random.Random(1)
    seq_len = 64
    segs: list[Segment] = []
    for k in range(60):
        n = rng.randint(seq_len + 1, 5 * seq_len) if k % 2 else rng.randint(2, seq_len)
        segs += chunk_document([rng.randrange(2, 500) for _ in range(n)], seq_len, "raw")
    stats = PackStats(seq_len)
    rows = list(pack_segments(segs, seq_len, PAD, stats=stats, window=1000))
    total = sum(len(s) for s in segs)
    assert len(rows) <= -(-total // seq_len) + 1  # tails cut into gaps: ~as few rows as the tokens allow
    assert Counter(t for r in rows for t in r.input_ids[:r.length].tolist()) == Counter(
        t for s in segs for t in s.input_ids)
    pieces = [tuple(r.input_ids[a:b].tolist()) for r in rows
              for a, b in zip(*(lambda st: (st[:-1], st[1:]))(
                  [*np.nonzero(r.position_ids[:r.length] == 0)[0].tolist(), r.length]), strict=True)]
    for s in segs:  # whole segments (short documents, full chunks) are never cut
        if not s.splittable:
            assert tuple(s.input_ids) in pieces
    assert all(len(p) >= 16 or p in {tuple(s.input_ids) for s in segs} for p in pieces)
    assert all(check_row(r.input_ids, r.position_ids, r.labels, seq_len) == [] for r in rows)


def test_special_token_strings_in_text_are_plain_text():
    tok = train_bpe_tokenizer(["대한민국 헌법"] * 5, 300)
    text = "앞 <|endoftext|> 뒤 <|pad|>"
    (seg,) = tokenize_documents([text], tok, 64)
    assert list(seg.input_ids).count(tok.eos_token_id) == 1 and seg.input_ids[-1] == tok.eos_token_id
    assert tok.pad_token_id not in seg.input_ids and tok.decode(seg.input_ids[:-1]) == text
