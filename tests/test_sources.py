"""Reading raw documents: formats, directory expansion, and every bad-input case (counted or strict)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kcpt.data.rejects import RejectReport
from kcpt.data.sources import iter_input_files, read_documents
from kcpt.errors import InputError


def _jsonl(path: Path, lines: list[bytes | str | dict]) -> Path:
    with open(path, "wb") as f:
        for ln in lines:
            if isinstance(ln, dict):
                ln = json.dumps(ln, ensure_ascii=False)
            f.write((ln.encode() if isinstance(ln, str) else ln) + b"\n")
    return path


def _read(paths, **kw) -> tuple[list, RejectReport]:
    rep = RejectReport()
    return list(read_documents(paths, report=rep, **kw)), rep


def test_txt_one_document_per_file(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("첫 줄\n\n\n둘째 문단\n", encoding="utf-8")
    docs, rep = _read([p])
    assert [d.text for d in docs] == ["첫 줄\n\n\n둘째 문단"]
    assert docs[0].doc_id == f"{p}#1" and docs[0].source == str(p) and rep.total == 0


def test_txt_blank_line_split(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("\n\n하나 첫 줄\n\n하나 둘째 문단\n\n\n둘\n \t\n\n\n\n셋 첫 줄\n셋 둘째 줄\n\n\n", encoding="utf-8")
    docs, rep = _read([p], txt_split="blank_lines")
    assert [d.text for d in docs] == ["하나 첫 줄\n\n하나 둘째 문단", "둘", "셋 첫 줄\n셋 둘째 줄"]
    assert [d.meta["line"] for d in docs] == [3, 8, 13]
    assert [d.doc_id for d in docs] == [f"{p}#1", f"{p}#2", f"{p}#3"]


def test_jsonl_text_field_and_directory_expansion(tmp_path: Path) -> None:
    sub = tmp_path / "corpus" / "nested"
    sub.mkdir(parents=True)
    _jsonl(tmp_path / "corpus" / "b.jsonl", [{"body": "둘", "id": 7}])
    _jsonl(sub / "a.jsonl", [{"body": "하나"}, ""])
    (sub / "notes.md").write_text("x")
    (tmp_path / "corpus" / ".hidden.txt").write_text("x")
    rep = RejectReport()
    files = iter_input_files([tmp_path / "corpus"], report=rep)
    assert files == [tmp_path / "corpus" / "b.jsonl", sub / "a.jsonl"]
    assert rep.notices == {"skipped_file": 2}  # notes.md, .hidden.txt
    docs, rep = _read([tmp_path / "corpus"], text_field="body")
    assert [(d.text, d.meta.get("id")) for d in docs] == [("둘", 7), ("하나", None)]
    assert docs[1].doc_id == f"{sub / 'a.jsonl'}:1"
    assert rep.notices == {"blank_line": 1, "skipped_file": 2} and rep.total == 0


def test_unknown_extension_and_missing_path(tmp_path: Path) -> None:
    p = tmp_path / "data.csv"
    p.write_text("x")
    with pytest.raises(InputError) as e:
        iter_input_files([p])
    assert str(p) in str(e.value) and "'.csv'" in str(e.value) and ".jsonl" in str(e.value)
    with pytest.raises(InputError, match="does not exist") as e:
        _read([tmp_path / "nope.txt"])
    assert "nope.txt" in str(e.value)


def test_bad_jsonl_lines_are_counted_with_file_line_field(tmp_path: Path) -> None:
    p = _jsonl(tmp_path / "bad.jsonl", [
        {"text": "좋은 줄"},                     # 1
        b'{"text": "\xff\xfe broken"}',          # 2 invalid utf-8
        '{"text": "no closing brace"',           # 3 bad json
        '["a list"]',                            # 4 not an object
        {"other": "x"},                          # 5 missing field
        {"text": 3},                             # 6 not a string
        '{"text": "lone \\ud800 surrogate"}',    # 7 not encodable
        {"text": "마지막"},                      # 8
    ])
    docs, rep = _read([p])
    assert [d.text for d in docs] == ["좋은 줄", "마지막"]
    assert rep.counts == {"bad_json": 1, "invalid_utf8": 2, "missing_field": 2, "not_object": 1}
    ex = rep.to_dict()["examples"]
    assert ex["invalid_utf8"][0].startswith(f"{p}: line 2:") and "byte 11" in ex["invalid_utf8"][0]
    assert f"{p}: line 3:" in ex["bad_json"][0] and "Expecting" in ex["bad_json"][0]
    assert f"{p}: line 4:" in ex["not_object"][0] and "list" in ex["not_object"][0]
    assert ex["missing_field"][0].startswith(f"{p}: line 5: field 'text': missing")
    assert ex["missing_field"][1].startswith(f"{p}: line 6: field 'text': not a string (int)")
    assert ex["invalid_utf8"][1].startswith(f"{p}: line 7: field 'text'")
    assert "invalid_utf8" in rep.summary() and "bad_json" in rep.summary()


@pytest.mark.parametrize("line, reason, where", [
    (b'{"text": "\xc3("}', "invalid_utf8", "line 2"),
    (b'{"text": ', "bad_json", "line 2"),
    (b'"just a string"', "not_object", "line 2"),
    (b'{"txt": "x"}', "missing_field", "line 2: field 'text'"),
    ('{"text": "첫째", "text": "둘째"}'.encode(), "duplicate_key", "line 2: field 'text'"),
    (b'{"text": "x", "meta": {"a": 1, "a": 2}}', "duplicate_key", "line 2: field 'a'"),
])
def test_strict_turns_each_count_into_an_error(tmp_path: Path, line: bytes, reason: str, where: str) -> None:
    p = _jsonl(tmp_path / "s.jsonl", [{"text": "좋음"}, line])
    assert len(_read([p])[0]) == 1
    with pytest.raises(InputError) as e:
        _read([p], strict=True)
    assert str(e.value).startswith(f"{p}: {where}") and f"[{reason}]" in str(e.value)
    assert e.value.line == 2


def test_bom_and_crlf_are_fixed_and_noted(tmp_path: Path) -> None:
    p = tmp_path / "win.txt"
    p.write_bytes(b"\xef\xbb\xbf\xec\xb2\xab \xec\xa4\x84\r\n\xeb\x91\x98\xec\xa7\xb8\r\n")
    q = _jsonl(tmp_path / "win.jsonl", [b'\xef\xbb\xbf{"text": "a"}\r'])
    docs, rep = _read([p, q], strict=True)
    assert [d.text for d in docs] == ["첫 줄\n둘째", "a"]
    assert rep.notices == {"bom_stripped": 2, "crlf_normalised": 2} and rep.total == 0
    assert rep.to_dict()["examples"]["crlf_normalised"][0] == f"{p}: line 1: CRLF line endings normalised to LF"


@pytest.mark.parametrize("encoding, hint", [("cp949", "reads as CP949/EUC-KR"), ("euc-kr", "reads as CP949/EUC-KR"),
                                             ("utf-16", "looks like UTF-16")])
def test_a_korean_file_in_another_encoding_is_rejected_with_the_conversion_to_run(tmp_path: Path, encoding: str,
                                                                                   hint: str) -> None:
    p = tmp_path / "legacy.txt"
    p.write_bytes("대한민국은 민주공화국이다.\n".encode(encoding))
    docs, rep = _read([p])
    assert docs == [] and rep.counts == {"invalid_utf8": 1}
    msg = rep.to_dict()["examples"]["invalid_utf8"][0]
    assert hint in msg and "iconv -f" in msg, msg


def test_bare_cr_line_endings_split_txt_documents(tmp_path: Path) -> None:
    p = tmp_path / "mac.txt"
    p.write_bytes("첫 문서\r둘째 줄\r\r\r다음 문서\r".encode())
    docs, rep = _read([p], txt_split="blank_lines")
    assert [d.text for d in docs] == ["첫 문서\n둘째 줄", "다음 문서"]
    assert rep.notices == {"cr_normalised": 1} and rep.total == 0
    docs, _ = _read([p])  # one document per file: its line breaks are LF
    assert [d.text for d in docs] == ["첫 문서\n둘째 줄\n\n\n다음 문서"]


def test_ten_megabyte_line_is_rejected_and_reading_goes_on(tmp_path: Path) -> None:
    p = tmp_path / "huge.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "first"}\n{"text": "')
        f.write(b"a" * 10_000_000)
        f.write(b'"}\n{"text": "after"}\n')
    docs, rep = _read([p])
    assert [d.text for d in docs] == ["first", "after"]
    assert rep.counts == {"line_too_long": 1}
    msg = rep.to_dict()["examples"]["line_too_long"][0]
    assert msg.startswith(f"{p}: line 2:") and "max_line_chars=1000000" in msg
    with pytest.raises(InputError, match="line 2"):
        _read([p], strict=True)


def test_txt_bad_line_drops_its_document_only(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_bytes("하나\n\n\n둘 시작\n".encode() + b"bad \xff byte\n" + "둘 끝\n\n\n셋\n".encode())
    docs, rep = _read([p], txt_split="blank_lines")
    assert [d.text for d in docs] == ["하나", "셋"]
    assert rep.counts == {"invalid_utf8": 1}
    assert rep.to_dict()["examples"]["invalid_utf8"][0].startswith(f"{p}: line 5: invalid UTF-8 at byte 5")
    long = tmp_path / "long.txt"
    long.write_text("앞\n\n\n" + "가" * 50 + "\n\n\n뒤\n", encoding="utf-8")
    docs, rep = _read([long], txt_split="blank_lines", max_line_chars=20)
    assert [d.text for d in docs] == ["앞", "뒤"] and rep.counts == {"line_too_long": 1}


def test_parquet_column_nulls_and_missing_column(tmp_path: Path) -> None:
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["가나다", None, "라마"], "n": [1, 2, 3]}), p)
    docs, rep = _read([p], text_field="content")
    assert [(d.text, d.meta["row"]) for d in docs] == [("가나다", 1), ("라마", 3)]
    assert rep.counts == {"missing_field": 1}
    assert rep.to_dict()["examples"]["missing_field"][0].startswith(f"{p}: field 'content': row 2: null")
    with pytest.raises(InputError) as e:
        _read([p])
    assert str(p) in str(e.value) and "field 'text'" in str(e.value) and "content" in str(e.value)
    with pytest.raises(InputError, match="must hold strings"):
        _read([p], text_field="n")


def test_a_parquet_value_that_is_not_utf8_is_counted_naming_row_and_field(tmp_path: Path) -> None:
    """Spark and other writers put bytes into a ``string`` column unchecked: a CP949 value is one counted reject
    (row, field, byte, the encoding hint), not a traceback that ends the prepare; its batch's other rows are read."""
    text = "대한민국은 민주공화국이다."
    values = [text.encode(), text.encode("cp949"), None, "둘째".encode()]
    for typ in ("string", "dictionary"):
        col = pa.array(values, pa.binary()).view(pa.string())
        if typ == "dictionary":
            col = col.dictionary_encode()
        p = tmp_path / f"{typ}.parquet"
        pq.write_table(pa.table({"body": col}), p)
        docs, rep = _read([p], text_field="body")
        assert [(d.text, d.meta["row"]) for d in docs] == [(text, 1), ("둘째", 4)], typ
        assert rep.counts == {"invalid_utf8": 1, "missing_field": 1}, typ
        example = rep.to_dict()["examples"]["invalid_utf8"][0]
        assert example.startswith(f"{p}: field 'body': row 2: invalid UTF-8 at byte 1") and "CP949" in example
        with pytest.raises(InputError, match="row 2: invalid UTF-8"):
            _read([p], text_field="body", strict=True)


def test_a_dictionary_encoded_text_column_is_read(tmp_path: Path) -> None:
    """pandas writes a ``category`` column as an Arrow dictionary of strings; it holds text like any other."""
    p = tmp_path / "cat.parquet"
    text = pa.array(["가나다", None, "가나다", "라마"]).dictionary_encode()
    pq.write_table(pa.table({"text": text}), p)
    assert pa.types.is_dictionary(pq.ParquetFile(p).schema_arrow.field("text").type)
    docs, rep = _read([p])
    assert [d.text for d in docs] == ["가나다", "가나다", "라마"] and rep.counts == {"missing_field": 1}
    pq.write_table(pa.table({"text": pa.array([1, 2]).dictionary_encode()}), p)
    with pytest.raises(InputError, match="must hold strings"):
        _read([p])


def test_hf_save_to_disk_dirs(tmp_path: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": ["하나", "둘", "셋"]})
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds.select([0, 1]), "test": ds.select([2])}).save_to_disk(str(tmp_path / "dd"))
    docs, rep = _read([tmp_path / "single"])
    assert [d.text for d in docs] == ["하나", "둘", "셋"] and rep.total == 0
    docs, _ = _read([tmp_path / "dd"])  # splits in sorted name order: test, train
    assert [d.text for d in docs] == ["셋", "하나", "둘"]
    assert docs[0].source == f"{tmp_path / 'dd'}[test]"
    # A directory that contains an HF dataset dir is expanded to it (its .arrow files are not listed).
    assert iter_input_files([tmp_path]) == [tmp_path / "dd", tmp_path / "single"]
    with pytest.raises(InputError) as e:
        _read([tmp_path / "single"], text_field="body")
    assert "single" in str(e.value) and "field 'body'" in str(e.value)
