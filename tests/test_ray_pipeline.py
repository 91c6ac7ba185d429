"""The Ray Data prepare pipeline matches the local one: same tokens, valid rows, exact dedup across blocks."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import ray

from kcpt.config import DatasetConfig, load_config
from kcpt.data.demo import konlpy_corpus_dir, resolve_inputs
from kcpt.data.packing import check_row
from kcpt.data.prepare import prepare_dataset
from kcpt.data.ray_pipeline import prepare_dataset_ray, read_prepared
from kcpt.data.shards import read_manifest, read_rows
from kcpt.errors import InputError
from kcpt.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(load_config().tokenizer)


def _tokens(directory, pad_id: int) -> Counter:
    c: Counter = Counter()
    for ids in read_rows(directory)["input_ids"].to_pylist():
        c.update(t for t in ids if t != pad_id)
    return c


def _prepare_both(name, ds, cfg, tmp_path, tok):
    local = prepare_dataset(name, ds, cfg, tmp_path / "local", tok, progress=False)
    on_ray = prepare_dataset_ray(name, ds, cfg, tmp_path / "ray", tok, window=64, progress=False)
    return read_manifest(local), read_manifest(on_ray), local, on_ray


def test_demo_raw_same_tokens_and_valid_rows(ray_local, tok, tmp_path):
    cfg = load_config()
    ml, mr, local, on_ray = _prepare_both("raw_train", cfg.data.datasets["raw_train"], cfg, tmp_path, tok)
    assert mr["pipeline"] == "ray_data" and mr["kind"] == "raw"
    assert _tokens(on_ray, tok.pad_token_id) == _tokens(local, tok.pad_token_id)
    assert mr["tokens"] == ml["tokens"] and abs(mr["rows"] - ml["rows"]) <= 2
    assert [i["documents"] for i in mr["inputs"]] == [i["documents"] for i in ml["inputs"]]
    table = read_rows(on_ray)
    for ids, pos, labels in zip(table["input_ids"].to_pylist(), table["position_ids"].to_pylist(),
                                table["labels"].to_pylist(), strict=True):
        assert check_row(ids, pos, labels, cfg.data.seq_len) == []
    assert read_prepared(on_ray).count() == mr["rows"]


def test_dedup_is_exact_across_blocks_and_exam_matches(ray_local, tok, tmp_path):
    text = (konlpy_corpus_dir() / "kolaw" / "constitution.txt").read_text(encoding="utf-8")
    paras = [p for p in text.split("\n") if len(p) > 60][:14]
    assert len(set(paras)) == 14
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"  # one block per file; b repeats 4 of a's documents
    a.write_text("".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in paras[:8]), encoding="utf-8")
    b.write_text("".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in paras[4:12]), encoding="utf-8")
    c = tmp_path / "c.txt"  # two documents under data.txt_split=blank_lines
    c.write_text(f"{paras[12]}\n\n\n{paras[13]}\n", encoding="utf-8")
    cfg = load_config(None, ["data.seq_len=64", "data.txt_split=blank_lines"])
    ds = DatasetConfig(kind="raw", inputs=[str(a), str(b), str(c)])
    ml, mr, local, on_ray = _prepare_both("dup", ds, cfg, tmp_path, tok)
    assert mr["rejects"].get("duplicate") == ml["rejects"].get("duplicate") == 4
    kept = sum(i["documents"] for i in ml["inputs"])
    assert sum(i["documents"] for i in mr["inputs"]) == kept == 18 - sum(ml["rejects"].values()) == 14
    assert mr["inputs"][2]["documents"] == ml["inputs"][2]["documents"] == 2
    assert _tokens(on_ray, tok.pad_token_id) == _tokens(local, tok.pad_token_id)

    (qa,) = resolve_inputs(["demo:qa_val"])
    (tmp_path / "exam_in").mkdir()
    again = tmp_path / "exam_in" / "again.jsonl"  # another file (another block) repeating 3 item ids
    again.write_text("".join(qa.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    (tmp_path / "exam_in" / "notes.txt").write_text("메모", encoding="utf-8")  # in a walk: skipped, noticed
    exam = DatasetConfig(kind="exam", inputs=[str(qa), str(tmp_path / "exam_in")])
    ml, mr, local, on_ray = _prepare_both("qa_val", exam, load_config(), tmp_path / "exam", tok)
    assert _tokens(on_ray, tok.pad_token_id) == _tokens(local, tok.pad_token_id)
    assert mr["label_tokens"] == ml["label_tokens"] and mr["rejects"] == ml["rejects"] == {"duplicate_id": 3}
    assert mr["notices"].get("skipped_file") == ml["notices"].get("skipped_file") == 1
    # the kept items (exam accuracy reads them), in input order, the same from both pipelines
    assert (on_ray / "items.jsonl").read_bytes() == (local / "items.jsonl").read_bytes()
    assert mr["items"] == ml["items"] == len(qa.read_text(encoding="utf-8").splitlines())


def test_strict_error_inside_a_task_reaches_the_caller(ray_local, tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "대한민국은 민주공화국이다. 모든 권력은 국민으로부터 나온다."}, ensure_ascii=False)
    bad.write_text(good + '\n{"body": 1}\n', encoding="utf-8")
    cfg = load_config(None, ["data.strict=true"])
    with pytest.raises(InputError, match="bad.jsonl: line 2: field 'text'") as err:
        prepare_dataset_ray("bad", DatasetConfig(kind="raw", inputs=[str(bad)]), cfg, tmp_path / "o", tok,
                            progress=False)
    assert "\n" not in str(err.value) and not isinstance(err.value, ray.exceptions.RayError)
    assert not (tmp_path / "o").exists()


def test_all_rejected_input_writes_valid_empty_dataset(ray_local, tok, tmp_path):
    """Ray Data writes no file for zero rows: the dataset is still complete (one empty shard), as locally."""
    inp = tmp_path / "rep.jsonl"
    inp.write_text("".join(json.dumps({"text": f"헌법 제{i}조는 권리를 정한다. " * 4}, ensure_ascii=False) + "\n"
                           for i in range(5)), encoding="utf-8")
    cfg = load_config()
    ml, mr, _, on_ray = _prepare_both("rep", DatasetConfig(kind="raw", inputs=[str(inp)]), cfg, tmp_path, tok)
    assert ml["rows"] == mr["rows"] == 0 and mr["rejects"] == ml["rejects"] and sum(mr["rejects"].values()) == 5
    assert read_rows(on_ray).num_rows == 0
