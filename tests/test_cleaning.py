"""Normalisation, quality filters, dedup and the reject report."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from kcpt.config import FilterConfig
from kcpt.data.cleaning import (
    clean_documents,
    duplicate_line_fraction,
    hangul_ratio,
    normalize_text,
    quality_reject_reason,
    top_ngram_fraction,
)
from kcpt.data.rejects import RejectReport
from kcpt.data.sources import read_documents
from kcpt.data.types import Document
from kcpt.errors import InputError

KO = "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다."


def test_normalize_text() -> None:
    decomposed = unicodedata.normalize("NFD", "한국어")
    assert len(decomposed) > 3
    raw = f"\n  \r\n{decomposed} \t\r\n둘째\x00\x07줄\u00a0 \r셋\t째\x1b\ufeff\n\n"
    out = normalize_text(raw)
    assert out == "한국어\n둘째줄\n셋\t째"
    assert normalize_text(out) == out
    # page and line breaks of other kinds (a PDF's form feed, VT, NEL, LS, PS) end a line; deleted, they glued words
    for brk in "\x0b\x0c\x85\u2028\u2029":
        assert normalize_text(f"첫 페이지 끝{brk}둘째 페이지") == "첫 페이지 끝\n둘째 페이지", repr(brk)
        assert normalize_text(f"- 1 -\n\n{brk}법률") == "- 1 -\n\n법률", repr(brk)  # at a line's start: dropped


def test_hangul_ratio() -> None:
    assert hangul_ratio("한국어 abc") == pytest.approx(3 / 6)
    assert hangul_ratio("한국 漢字") == pytest.approx(0.5)
    assert hangul_ratio("ㄱㄴ ᄀ 123 !!") == 1.0  # compatibility and conjoining jamo count; digits do not
    assert hangul_ratio("1234 ...") == 0.0


def test_each_filter_reason() -> None:
    f = FilterConfig()
    assert quality_reject_reason(KO, f) is None
    assert quality_reject_reason("짧은 글", f) == "too_short"
    assert quality_reject_reason("This document is written in English with 한국 words.", f) == "hangul_ratio"
    lines = "\n".join(["같은 줄이 반복됩니다"] * 3 + ["다른 줄 하나", "또 다른 줄"])
    assert duplicate_line_fraction(lines) == pytest.approx(2 / 5)
    assert quality_reject_reason(lines, f) == "repeated_lines"
    spam = " ".join(["지금 바로 구매 하세요 정말 좋은 기회"] * 6) + " " + KO
    assert top_ngram_fraction(spam, 5) == pytest.approx(6 * 5 / (42 + len(KO.split())))
    assert quality_reject_reason(spam, f) == "repeated_ngrams"
    assert top_ngram_fraction("하나 둘 셋 넷 다섯 여섯", 5) == 0.0  # no repeat: never flagged
    assert top_ngram_fraction("가 나 다 라 마 가 나 다 라 마", 5) == 1.0
    assert quality_reject_reason(spam, FilterConfig(max_top_ngram_frac=1.0)) is None


def _doc(text: str, i: int) -> Document:
    return Document(text=text, source="mem.jsonl", doc_id=f"mem.jsonl:{i}", meta={"line": i})


def test_clean_documents_counts_every_drop_and_dedups() -> None:
    docs = [_doc(KO, 1), _doc(" \n\x00 ", 2), _doc("짧다", 3), _doc(KO.replace("다.", "다.\r\n") + "  ", 4),
            _doc(unicodedata.normalize("NFD", KO), 5), _doc(KO + " 추가 문장입니다.", 6)]
    rep = RejectReport()
    kept = list(clean_documents(docs, FilterConfig(), rep))
    assert [d.doc_id for d in kept] == ["mem.jsonl:1", "mem.jsonl:4", "mem.jsonl:6"]
    assert kept[1].text == KO.replace("이다.", "이다.\n")
    assert rep.counts == {"duplicate": 1, "empty": 1, "too_short": 1}
    dup = rep.to_dict()["examples"]["duplicate"][0]
    assert dup.startswith("mem.jsonl: line 5:") and "same text as mem.jsonl:1" in dup
    assert kept[0].meta["sha256"] != kept[2].meta["sha256"]
    rep2 = RejectReport()
    assert len(list(clean_documents(docs, FilterConfig(dedup=False), rep2))) == 4
    assert "duplicate" not in rep2.counts


def test_clean_strict_raises_with_location() -> None:
    with pytest.raises(InputError) as e:
        list(clean_documents([_doc(KO, 1), _doc("짧다", 7)], FilterConfig(), RejectReport(), strict=True))
    assert str(e.value).startswith("mem.jsonl: line 7:") and "[too_short]" in str(e.value)


def test_read_then_clean_from_files(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text(f"{KO}\n\n\nEnglish only text that is long enough to pass.\n\n\n{KO}\n", encoding="utf-8")
    rep = RejectReport()
    kept = list(clean_documents(read_documents([p], report=rep, txt_split="blank_lines"), FilterConfig(), rep))
    assert [d.doc_id for d in kept] == [f"{p}#1"]
    assert rep.counts == {"duplicate": 1, "hangul_ratio": 1}
    assert rep.to_dict()["examples"]["hangul_ratio"][0].startswith(f"{p}: line 4:")


def test_report_merge_and_dict() -> None:
    a, b = RejectReport(max_examples=2), RejectReport()
    for i in range(3):
        a.add("bad_json", f"f: line {i}: x")
    b.add("bad_json", "g: line 9: y")
    b.add("empty", "g: line 1: z")
    b.note("bom_stripped", "g: BOM")
    a.merge(b)
    d = a.to_dict()
    assert d["rejects"] == {"bad_json": 4, "empty": 1} and d["notices"] == {"bom_stripped": 1}
    assert d["examples"]["bad_json"] == ["f: line 0: x", "f: line 1: x"]
    assert d["examples"]["bom_stripped"] == ["g: BOM"] and a.total == 5
    assert "bad_json" in a.summary() and "bom_stripped" in a.summary()
    assert RejectReport().summary() == "no rejects, no notices"
    assert RejectReport.from_dict(d).to_dict() == d
