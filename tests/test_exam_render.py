"""Exam rendering: template, choices, answer-only labels from offsets (incl. a token straddling the boundary)."""

from __future__ import annotations

import pytest

from kcpt.config import ExamTemplate
from kcpt.data.exam import ExamTooLong, encode_exam_item, encode_exam_items, render_prompt
from kcpt.data.rejects import RejectReport
from kcpt.data.types import IGNORE_INDEX, ExamItem
from kcpt.model.tokenizer import train_bpe_tokenizer

CORPUS = ["질문: 한국의 수도는?\n답: 대한민국 서울", "답: 대한민국", "대한민국 헌법 제1조 대한민국은 민주공화국이다.",
          "질문: 대한민국의 국민이 되는 요건은?\n답: 대한민국 법률로 정한다."] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, 400)


def test_render_template_and_choices():
    t = ExamTemplate()
    assert render_prompt(ExamItem(id="a", answer="x", kind="qa", question="수도는?"), t) == "질문: 수도는?\n답: "
    item = ExamItem(id="b", answer="②", kind="qa", question="수도는?", choices=["부산", "서울"])
    assert render_prompt(item, t) == "질문: 수도는?\n①. 부산\n②. 서울\n답: "
    own = ExamItem(id="c", answer="y", kind="example", prompt="그대로 {question}", question="무시")
    assert render_prompt(own, t) == "그대로 {question}"


def test_boundary_token_straddling_prompt_and_answer_is_labelled(tok):
    item = ExamItem(id="q1", answer="대한민국", kind="qa", question="한국의 수도는?")
    prompt = render_prompt(item, ExamTemplate())
    enc = tok(prompt + item.answer, return_offsets_mapping=True)
    start = len(prompt)
    straddling = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < start < e]
    assert straddling, "the test tokenizer must merge the prompt's trailing space into the answer"
    assert tok.convert_ids_to_tokens(enc["input_ids"][straddling[0]]).startswith("Ġ")  # ' 대...' merged

    seg = encode_exam_item(item, tok, ExamTemplate(), seq_len=64)
    n = len(enc["input_ids"])
    assert seg.input_ids[:n] == enc["input_ids"] and seg.input_ids[n:] == [tok.eos_token_id]
    for i, (_, e) in enumerate(enc["offset_mapping"]):
        if e <= start:
            assert seg.labels[i] == IGNORE_INDEX, f"prompt-only token {i} got a label"
        else:
            assert seg.labels[i] == seg.input_ids[i], f"answer token {i} lost its label"
    assert seg.labels[straddling[0]] == seg.input_ids[straddling[0]]
    assert seg.labels[-1] == tok.eos_token_id
    # the labelled tokens decode to the answer (with the merged space) + EOS
    answer_ids = [t for t in seg.labels if t != IGNORE_INDEX]
    assert tok.decode(answer_ids[:-1]).strip() == "대한민국"


def test_too_long_item_is_counted_or_raised(tok):
    long_item = ExamItem(id="long7", answer="대한민국 " * 40, kind="qa", question="q", source="qa.jsonl", line=7)
    ok = ExamItem(id="ok", answer="서울", kind="qa", question="수도는?", source="qa.jsonl", line=8)
    report = RejectReport()
    segs = list(encode_exam_items([long_item, ok], tok, ExamTemplate(), 32, report=report))
    assert len(segs) == 1 and report.counts == {"answer_truncated": 1}
    msg = report.to_dict()["examples"]["answer_truncated"][0]
    assert msg.startswith("qa.jsonl: line 7: item 'long7': rendered prompt + answer is ")
    with pytest.raises(ExamTooLong, match="qa.jsonl: line 7: item 'long7'"):
        list(encode_exam_items([long_item], tok, ExamTemplate(), 32, report=RejectReport(), strict=True))


def test_special_token_strings_in_an_item_are_plain_text(tok):
    item = ExamItem(id="s", answer="<|endoftext|> 서울", kind="qa", question="<|pad|> 수도는?")
    seg = encode_exam_item(item, tok, ExamTemplate(), seq_len=128)
    assert seg.input_ids.count(tok.eos_token_id) == 1 and seg.input_ids[-1] == tok.eos_token_id
    assert tok.pad_token_id not in seg.input_ids
    assert tok.decode([t for t in seg.labels if t != IGNORE_INDEX][:-1]).strip() == "<|endoftext|> 서울"
