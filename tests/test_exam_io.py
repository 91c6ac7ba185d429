"""Exam JSONL: both kinds, NFC, and every validation failure (file:line:field, counted or strict)."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from kcpt.data.exam_io import read_exam_items
from kcpt.data.rejects import RejectReport
from kcpt.errors import InputError


def _write(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def test_reads_both_kinds_and_normalises(tmp_path: Path) -> None:
    nfd = unicodedata.normalize("NFD", "헌법")
    p = _write(tmp_path / "exam.jsonl", [
        {"id": "q1", "question": f"{nfd} 제1조는?", "answer": "민주공화국", "kind": "qa"},
        {"id": 2, "question": "옳은 것은?", "choices": ["가", f"{nfd}"], "answer": "가", "kind": "example",
         "note": "extra"},
        {"id": "e3", "prompt": "빈칸은?\r\n답: ", "answer": " 정답", "kind": "example"},
    ])
    rep = RejectReport()
    items = list(read_exam_items([p], report=rep))
    assert [(i.id, i.kind, i.line, i.source) for i in items] == [
        ("q1", "qa", 1, str(p)), ("2", "example", 2, str(p)), ("e3", "example", 3, str(p))]
    assert items[0].question == "헌법 제1조는?" and items[0].prompt is None
    assert items[1].choices == ["가", "헌법"]
    assert items[2].prompt == "빈칸은?\n답: " and items[2].answer == " 정답"  # trailing/leading space kept
    assert rep.total == 0 and rep.notices == {"unknown_key": 1}
    assert [i.id for i in read_exam_items([p], report=RejectReport(), kind="example")] == ["2", "e3"]


def test_a_multiple_choice_answer_matches_its_choice_after_normalisation(tmp_path: Path) -> None:
    """The answer is compared with the choices as exam accuracy compares them (NFC, whitespace runs collapsed)."""
    nfd = unicodedata.normalize("NFD", "대한민국 헌법")
    p = _write(tmp_path / "mc.jsonl", [
        {"id": "m1", "question": "q", "choices": ["부산", "대한민국  헌법"], "answer": f" {nfd}\n", "kind": "qa"}])
    rep = RejectReport()
    assert [i.id for i in read_exam_items([p], report=rep, strict=True)] == ["m1"] and rep.total == 0


def test_control_characters_are_dropped_from_exam_text_as_from_raw_text(tmp_path: Path) -> None:
    """A NUL or BEL in a question or answer was kept and trained on; a form feed inside a line ends it."""
    p = _write(tmp_path / "c.jsonl", [
        {"id": "c1", "question": "수도\u0000는?\u000c다음 줄", "answer": "서울\u0007", "kind": "qa"},
        {"id": "c2", "prompt": "질문: 수도는?\n답: ", "answer": "서울", "kind": "example"}])
    first, second = read_exam_items([p], report=RejectReport(), strict=True)
    assert (first.question, first.answer) == ("수도는?\n다음 줄", "서울")
    assert second.prompt == "질문: 수도는?\n답: "  # the prompt's trailing space stays


BAD = [
    ({"id": "a", "question": "q", "kind": "qa"}, "missing_field", "answer"),
    ({"id": "a", "question": "q", "answer": "  ", "kind": "qa"}, "empty_field", "answer"),
    ({"id": "a", "question": "q", "answer": "\u200b\ufeff ", "kind": "qa"}, "empty_field", "answer"),  # invisible
    ({"id": "a", "question": "q", "choices": ["가", "\u200b"], "answer": "가", "kind": "qa"}, "bad_choices",
     "choices"),
    ({"id": "a", "question": "q", "answer": 5, "kind": "qa"}, "wrong_type", "answer"),
    ({"id": "a", "question": "q", "answer": "x", "kind": "quiz"}, "unknown_kind", "kind"),
    ({"id": "a", "question": "q", "answer": "x"}, "missing_field", "kind"),
    ({"question": "q", "answer": "x", "kind": "qa"}, "missing_field", "id"),
    ({"id": "a", "question": "q", "choices": "가,나", "answer": "x", "kind": "qa"}, "bad_choices", "choices"),
    ({"id": "a", "question": "q", "choices": ["가", 3], "answer": "x", "kind": "qa"}, "bad_choices", "choices"),
    ({"id": "a", "question": "q", "choices": [], "answer": "x", "kind": "qa"}, "bad_choices", "choices"),
    ({"id": "a", "prompt": "p", "question": "q", "answer": "x", "kind": "qa"}, "prompt_or_question", "prompt"),
    ({"id": "a", "answer": "x", "kind": "qa"}, "prompt_or_question", "question"),
    ({"id": "a", "prompt": "p", "choices": ["가"], "answer": "x", "kind": "qa"}, "bad_choices", "choices"),
    ({"id": "a", "question": "q", "choices": ["서울", "부산", "서울 "], "answer": "서울", "kind": "qa"}, "bad_choices",
     "choices"),
    ({"id": "a", "question": "q", "choices": ["서울", "부산"], "answer": "B", "kind": "qa"}, "answer_not_in_choices",
     "answer"),
    ({"id": "a", "question": "q", "choices": ["서울", "부산"], "answer": "1", "kind": "example"},
     "answer_not_in_choices", "answer"),
    ({"id": "a", "question": "q", "choices": ["서울", "부산"], "answer": "서울특별시", "kind": "qa"},
     "answer_not_in_choices", "answer"),
    ('{"id": "a", "question": "q"', "bad_json", None),
    ('[1, 2]', "not_object", None),
    ('{"id": "a", "question": "q", "answer": "첫째", "answer": "둘째", "kind": "qa"}', "duplicate_key", "answer"),
]


@pytest.mark.parametrize("record, reason, field", BAD)
def test_each_invalid_record_is_counted_then_strict_raises(tmp_path: Path, record, reason: str,
                                                            field: str | None) -> None:
    good = {"id": "ok", "question": "질문", "answer": "답", "kind": "qa"}
    p = _write(tmp_path / "bad.jsonl", [good, record, {**good, "id": "ok2"}])
    rep = RejectReport()
    assert [i.id for i in read_exam_items([p], report=rep)] == ["ok", "ok2"]
    assert rep.counts == {reason: 1}
    msg = rep.to_dict()["examples"][reason][0]
    prefix = f"{p}: line 2: field '{field}':" if field else f"{p}: line 2:"
    assert msg.startswith(prefix), msg
    with pytest.raises(InputError) as e:
        list(read_exam_items([p], report=RejectReport(), strict=True))
    assert str(e.value) == msg and (e.value.line, e.value.field) == (2, field)


def test_duplicate_ids_across_files_and_bad_utf8(tmp_path: Path) -> None:
    rec = {"id": "x1", "question": "질문", "answer": "답", "kind": "qa"}
    a = _write(tmp_path / "a.jsonl", [rec])
    b = tmp_path / "b.jsonl"
    b.write_bytes(b'{"id": "y", "question": "\xed\xa0\x80", "answer": "a", "kind": "qa"}\n'
                  + json.dumps({**rec, "kind": "example"}).encode() + b"\n")
    rep = RejectReport()
    assert [i.id for i in read_exam_items([a, b], report=rep)] == ["x1"]
    assert rep.counts == {"duplicate_id": 1, "invalid_utf8": 1}
    ex = rep.to_dict()["examples"]
    assert ex["duplicate_id"][0].startswith(f"{b}: line 2: field 'id': id 'x1' already used at {a}: line 1")
    assert ex["invalid_utf8"][0].startswith(f"{b}: line 1: invalid UTF-8")
    copy = _write(tmp_path / "copy.jsonl", [rec])
    with pytest.raises(InputError, match="duplicate_id"):
        list(read_exam_items([a, copy], report=RejectReport(), strict=True))
    rep = RejectReport()  # the same file given twice is read once (a notice), not a duplicate id
    assert [i.id for i in read_exam_items([a, a], report=rep, strict=True)] == ["x1"]
    assert rep.notices == {"duplicate_input": 1} and rep.counts == {}


def test_exam_inputs_must_be_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "exam.txt"
    p.write_text("x")
    with pytest.raises(InputError, match="jsonl") as e:
        list(read_exam_items([p], report=RejectReport()))
    assert str(p) in str(e.value)
    with pytest.raises(InputError, match="kind"):
        list(read_exam_items([], report=RejectReport(), kind="essay"))


def test_a_directory_of_exam_files_skips_other_kinds_of_file_with_a_notice(tmp_path: Path) -> None:
    d = tmp_path / "exam"
    d.mkdir()
    _write(d / "a.jsonl", [{"id": "q1", "question": "질문", "answer": "답", "kind": "qa"}])
    (d / "notes.txt").write_text("메모", encoding="utf-8")
    (d / "old.parquet").write_bytes(b"PAR1")
    rep = RejectReport()
    assert [i.id for i in read_exam_items([d], report=rep)] == ["q1"]
    assert rep.notices == {"skipped_file": 2} and rep.counts == {}
