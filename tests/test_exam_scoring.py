"""Exam accuracy scorer (kcpt.eval.exam_scoring): normalisation and char F1 on Korean text, MC log-likelihood
against a direct per-sequence computation, greedy decoding against a step-by-step loop without cache."""

from __future__ import annotations

import math

import pytest
import torch

from kcpt.config import ExamTemplate, ModelConfig
from kcpt.data.exam import render_prompt
from kcpt.data.types import ExamItem
from kcpt.errors import InputError
from kcpt.eval.exam_scoring import (
    char_f1,
    context_ids,
    exact_match,
    greedy_decode,
    normalize_answer,
    rank_slice,
    score_exam,
    sequence_logliks,
)
from kcpt.model.loading import build_tiny_model
from kcpt.model.tokenizer import train_bpe_tokenizer

CORPUS = ["질문: 한국의 수도는?\n답: 대한민국 서울", "답: 대한민국", "대한민국 헌법 제1조 대한민국은 민주공화국이다.",
          "질문: 대한민국의 국민이 되는 요건은?\n답: 대한민국 법률로 정한다.", "제3조 제128조 제29조 부산 서울"] * 20
T = ExamTemplate()


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, 400)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(ModelConfig(seed=3), len(tok), pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id).eval()


# --------------------------------------------------------------------------- pure functions


def test_normalize_answer_nfc_and_whitespace():
    assert normalize_answer("  대한민국의\n\t 영토는  ") == "대한민국의 영토는"
    decomposed = "\u1100\u1161\u11a8"  # ᄀ + ᅡ + ᆨ (conjoining jamo) → 각
    assert normalize_answer(decomposed) == "각"
    assert exact_match(" 제3조\n", "제3조")
    assert exact_match(decomposed + "  하다", "각 하다")
    assert not exact_match("대한 민국", "대한민국")  # a space inside is kept by exact match


def test_char_f1_korean():
    assert char_f1("대한민국", "대한민국") == 1.0
    assert char_f1("대한 민국", "대한민국") == 1.0  # whitespace does not count
    assert math.isclose(char_f1("대한민국", "대한민국의"), 2 * 1.0 * 0.8 / 1.8)
    assert math.isclose(char_f1("가가가", "가"), 2 * (1 / 3) * 1.0 / (1 / 3 + 1.0))  # multiset, not set
    assert char_f1("서울", "부산") == 0.0
    assert char_f1("", "가") == 0.0 and char_f1("가", "") == 0.0 and char_f1("", " ") == 1.0
    assert char_f1("\u1100\u1161", "가") == 1.0  # NFC before comparing


def test_rank_slice_disjoint_and_capped():
    items = list(range(7))
    parts = [rank_slice(items, r, 3) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items
    assert [x for r in range(2) for x in rank_slice(items, r, 2, max_items=5)] == [0, 2, 4, 1, 3]


# --------------------------------------------------------------------------- multiple choice


def _manual_loglik(model, tok, prompt: str, choice: str) -> tuple[float, int]:
    """One unpadded forward; answer tokens = those whose char span ends after len(prompt); no EOS."""
    enc = tok(prompt + choice, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    total, n = 0.0, 0
    for t, (_, end) in enumerate(enc["offset_mapping"]):
        if end > len(prompt) and t > 0:
            total += float(logp[t - 1, enc["input_ids"][t]])
            n += 1
    return total, n


MC = ExamItem(id="mc1", kind="example", question="대한민국의 수도는?", answer="서울",
              choices=["부산", "서울", "대한민국 헌법 제1조", "제128조"])


@pytest.mark.parametrize("norm", ["chars", "tokens", "none"])
def test_mc_prediction_is_the_manual_argmax(model, tok, norm):
    prompt = render_prompt(MC, T)
    manual = [_manual_loglik(model, tok, prompt, c) for c in MC.choices]
    if norm == "chars":  # lm-eval acc_norm: per character of the choice string
        scores = [s / len(c) for (s, _), c in zip(manual, MC.choices, strict=True)]
    elif norm == "tokens":
        scores = [s / n for s, n in manual]
    else:
        scores = [s for s, _ in manual]
    best = max(range(len(scores)), key=lambda i: scores[i])
    # make the model's choice certainly right, then certainly wrong
    right = ExamItem(**{**MC.__dict__, "answer": MC.choices[best]})
    wrong = ExamItem(**{**MC.__dict__, "id": "mc2", "answer": MC.choices[(best + 1) % 4]})
    res = score_exam(model, tok, [right, wrong], T, batch_size=3, length_norm=norm)
    assert res.n_mc == 2 and res.n_short == 0 and res.accuracy == 0.5
    assert [r["correct"] for r in res.per_item] == [True, False]
    assert [r["pred"] for r in res.per_item] == [MC.choices[best]] * 2
    assert res.exact_match is None and res.f1 is None


def test_batched_logliks_equal_unpadded(model, tok):
    from kcpt.eval.exam_scoring import choice_sequence

    prompt = render_prompt(MC, T)
    seqs = [choice_sequence(MC, c, tok, T) for c in MC.choices]
    assert len({len(ids) for ids, _ in seqs}) > 1  # padding is exercised
    got = sequence_logliks(model, seqs, pad_id=tok.pad_token_id, batch_size=4, device=torch.device("cpu"))
    for (s, n), c in zip(got, MC.choices, strict=True):
        ms, mn = _manual_loglik(model, tok, prompt, c)
        assert n == mn and math.isclose(s, ms, rel_tol=1e-5, abs_tol=1e-4)


def test_mc_answer_not_a_choice_is_an_input_error(model, tok):
    bad = ExamItem(id="bad", kind="qa", question="?", answer="②", choices=["부산", "서울"], source="x.jsonl", line=4)
    with pytest.raises(InputError, match="not one of its choices") as e:
        score_exam(model, tok, [bad], T)
    assert "x.jsonl" in str(e.value) and "4" in str(e.value)


# --------------------------------------------------------------------------- short answer


def _manual_greedy(model, ctx: list[int], n: int, eos: int) -> list[int]:
    ids = list(ctx)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_context_drops_trailing_whitespace(tok):
    prompt = "질문: 한국의 수도는?\n답: "
    ctx = context_ids(prompt, tok)
    assert tok.decode(ctx) == prompt.rstrip()


@pytest.mark.parametrize("ending", ["답: ", "답:\n", "답:\n\n", "답:"])
def test_the_trained_prompt_is_the_generation_context_whatever_the_trailing_whitespace(tok, ending):
    """The exam loss's prompt tokens (label -100) are exactly the generation context and the scoring context of
    every choice: the prompt's trailing whitespace is answer, merged into its first token or not. With a template
    ending in a newline (a token of its own here), the newline was a prompt token: trained never predicted, yet the
    first token a short answer's generation had to produce, and a choice's score depended on whether its first token
    swallowed the whitespace."""
    from kcpt.data.exam import answer_labels
    from kcpt.data.types import IGNORE_INDEX

    prompt = f"질문: 한국의 수도는?\n{ending}"
    for answer in ("서울", "1948", "대한민국"):
        ids, labels = answer_labels(prompt, answer, tok)
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        assert ids[:first] == context_ids(prompt, tok), (ending, answer)
        assert all(lab != IGNORE_INDEX for lab in labels[first:])  # the answer (and EOS) is one labelled run
        assert tok.decode(ids[first:-1]).strip() == answer


def test_greedy_decode_left_padded_equals_unbatched(model, tok):
    prompts = ["질문: 한국의 수도는?\n답: ", "답: ", "대한민국 헌법 제1조 대한민국은"]
    ctxs = [context_ids(p, tok) for p in prompts]
    got = greedy_decode(model, ctxs, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=6,
                        batch_size=3, device=torch.device("cpu"))
    assert got == [_manual_greedy(model, c, 6, tok.eos_token_id) for c in ctxs]


def test_short_answer_em_and_f1(model, tok):
    q = ExamItem(id="s1", kind="qa", question="한국의 수도는?", answer="x")
    pred = tok.decode(_manual_greedy(model, context_ids(render_prompt(q, T), tok), 12, tok.eos_token_id))
    right = ExamItem(id="s1", kind="qa", question="한국의 수도는?", answer=" " + pred + " ")
    wrong = ExamItem(id="s2", kind="qa", question="한국의 수도는?", answer=pred.strip()[:-1] or "없음")
    res = score_exam(model, tok, [right, wrong, MC], T, batch_size=2, max_new_tokens=12)
    assert res.n_short == 2 and res.n_mc == 1
    by = {r["id"]: r for r in res.per_item}
    assert by["s1"]["correct"] and by["s1"]["f1"] == 1.0 and by["s1"]["pred"] == normalize_answer(pred)
    assert not by["s2"]["correct"] and by["s2"]["f1"] == char_f1(pred, wrong.answer)
    assert res.exact_match == 0.5 and math.isclose(res.f1, (1.0 + by["s2"]["f1"]) / 2)
    assert [r["id"] for r in res.per_item] == ["s1", "s2", "mc1"]
