"""`kcpt prepare` on real files (subprocess) and prepare_all's cache: shards, manifest, row rules, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kcpt.config import load_config
from kcpt.data.demo import konlpy_corpus_dir
from kcpt.data.packing import check_row
from kcpt.data.prepare import prepare_all
from kcpt.data.shards import iter_rows, prepared_sha256, read_manifest, read_rows
from kcpt.data.types import IGNORE_INDEX, ROW_SCHEMA
from kcpt.hashing import sha256_file
from kcpt.model.tokenizer import tokenizer_sha256

LONG = (konlpy_corpus_dir() / "kolaw" / "constitution.txt").read_text(encoding="utf-8")[:1500]


def _kcpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kcpt.cli", "prepare", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=120)


def _check_rows(directory: Path, seq_len: int) -> dict:
    table = read_rows(directory)
    assert table.schema.equals(ROW_SCHEMA)
    m = read_manifest(directory)
    for ids, pos, labels in zip(table["input_ids"].to_pylist(), table["position_ids"].to_pylist(),
                                table["labels"].to_pylist(), strict=True):
        assert check_row(ids, pos, labels, seq_len) == []
    assert m["rows"] == table.num_rows and m["seq_len"] == seq_len
    return m


def test_cli_raw_writes_shards_manifest_and_counts_rejects(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"text": LONG}, ensure_ascii=False) + "\n" + '{"txt": "x"}\n'
                    + json.dumps({"text": "짧다"}, ensure_ascii=False) + "\n" + "not json\n"
                    + json.dumps({"text": LONG}, ensure_ascii=False) + "\n", encoding="utf-8")
    b_txt = ("헌법 제1조 대한민국은 민주공화국이다. 모든 권력은 국민으로부터 나온다.\n\n\n"
             "헌법 제2조 대한민국의 국민이 되는 요건은 법률로 정한다.\n")  # two documents (blank_lines)
    (tmp_path / "b.txt").write_text(b_txt, encoding="utf-8")
    out = tmp_path / "out"
    r = _kcpt("raw", "--input", str(data), str(tmp_path / "b.txt"), "--out", str(out), "--seq-len", "64",
              "--txt-split", "blank_lines")
    assert r.returncode == 0, r.stderr
    assert "pack efficiency" in r.stdout and str(out) in r.stdout and "missing_field" in r.stdout
    m = _check_rows(out, 64)
    for key in ("seq_len", "rows", "tokens", "pack_efficiency", "tokenizer_sha256", "inputs", "rejects", "kind",
                "kcpt_version", "created"):
        assert key in m
    assert m["kind"] == "raw" and m["rows"] >= 4  # the long document is split over several rows
    assert m["rejects"] == {"bad_json": 1, "duplicate": 1, "missing_field": 1, "too_short": 1}
    assert [(Path(i["path"]).name, i["documents"]) for i in m["inputs"]] == [("in.jsonl", 1), ("b.txt", 2)]
    assert m["inputs"][0]["sha256"] == sha256_file(data)
    assert m["tokenizer_sha256"] == tokenizer_sha256(out / "tokenizer")
    assert len(prepared_sha256(out)) == 64
    assert set(read_rows(out)["source"].to_pylist()) == {"out"}
    assert sum(b.num_rows for b in iter_rows(out)) == m["rows"]
    assert pq.read_schema(out / "part-00000.parquet").field("labels").type.value_type.bit_width == 32

    again = _kcpt("raw", "--input", str(data), "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_cli_strict_bad_input_names_file_line_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": LONG}, ensure_ascii=False) + "\n" + '{"body": "x"}\n', encoding="utf-8")
    r = _kcpt("raw", "--input", str(bad), "--out", str(tmp_path / "o"), "--strict")
    assert r.returncode == 2
    assert f"{bad}: line 2: field 'text'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_exam_labels_only_answer_and_counts_too_long(tmp_path):
    items = tmp_path / "qa.jsonl"
    items.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in [
        {"id": "q1", "kind": "qa", "question": "대한민국의 주권은 누구에게 있는가?", "answer": "국민"},
        {"id": "q2", "kind": "qa", "question": LONG, "answer": "국민"},
    ]) + "\n", encoding="utf-8")
    out = tmp_path / "exam"
    r = _kcpt("exam", "--input", str(items), "--out", str(out), "--seq-len", "48")
    assert r.returncode == 0, r.stderr
    m = _check_rows(out, 48)
    assert m["rejects"] == {"answer_truncated": 1}
    assert f"{items}: line 2: item 'q2'" in m["reject_examples"]["answer_truncated"][0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    (row,) = read_rows(out).to_pylist()
    labelled = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert labelled[-1] == tok.eos_token_id and tok.decode(labelled[:-1]).strip() == "국민"
    # items.jsonl: the kept items only (exam accuracy reads it), covered by the manifest's hash
    from kcpt.data.exam_io import read_items_file

    assert [(i.id, i.answer, i.line) for i in read_items_file(out / "items.jsonl")] == [("q1", "국민", 1)]
    assert m["items"] == 1 and m["items_sha256"] == sha256_file(out / "items.jsonl")


def test_prepare_all_caches_by_content(tmp_path):
    cfg = load_config(None, [f"data.prepared_root={tmp_path}", "logging.progress=false"])
    names = ["raw_val", "qa_val"]
    first = prepare_all(cfg, names)
    stamp = {n: (d / "manifest.json").stat().st_mtime_ns for n, d in first.items()}
    assert prepare_all(cfg, names) == first
    assert {n: (d / "manifest.json").stat().st_mtime_ns for n, d in first.items()} == stamp  # reused
    toks = list(tmp_path.glob("tokenizer-*"))
    assert len(toks) == 1
    m = _check_rows(first["qa_val"], 256)
    assert toks[0].name == f"tokenizer-{m['tokenizer_sha256'][:12]}"
    assert m["kind"] == "exam" and m["inputs"][0]["documents"] > 0
    other = prepare_all(cfg.model_copy(update={"data": cfg.data.model_copy(update={"seq_len": 128})}), ["raw_val"])
    assert other["raw_val"] != first["raw_val"] and read_manifest(other["raw_val"])["seq_len"] == 128
    # an exam set's JSONL is read with data.filters.max_line_chars: raised after a line_too_long, the set is read
    # again, not the cached one with the long lines dropped given back
    lines = cfg.data.filters.model_copy(update={"max_line_chars": 123_456})
    again = prepare_all(cfg.model_copy(update={"data": cfg.data.model_copy(update={"filters": lines})}), ["qa_val"])
    assert again["qa_val"] != first["qa_val"]


def test_unknown_dataset_name_is_config_error(tmp_path):
    from kcpt.errors import ConfigError

    cfg = load_config(None, [f"data.prepared_root={tmp_path}"])
    with pytest.raises(ConfigError, match="nope"):
        prepare_all(cfg, ["nope"], progress=False)


def test_all_rejected_input_writes_valid_empty_dataset_and_warns(tmp_path):
    from kcpt.config import DatasetConfig
    from kcpt.data.commands import format_manifest
    from kcpt.data.prepare import prepare_dataset
    from kcpt.model.tokenizer import load_tokenizer

    bad = tmp_path / "x.jsonl"
    bad.write_text('{"body": 1}\n', encoding="utf-8")
    cfg = load_config(None, ["logging.progress=false"])
    out = prepare_dataset("x", DatasetConfig(kind="raw", inputs=[str(bad)]), cfg, tmp_path / "o",
                          load_tokenizer(cfg.tokenizer), progress=False)
    m = read_manifest(out)
    assert m["rows"] == 0 and m["rejects"] == {"missing_field": 1} and read_rows(out).num_rows == 0
    assert "warning: no rows written" in format_manifest(out, m)
