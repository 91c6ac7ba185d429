"""Prepare at cluster scale: one big JSONL file is read by many Ray tasks, dedup is hash-partitioned and keeps the
first copy in input order, the tokenizer lives in an actor pool, inputs and outputs at URIs are read and written by
the tasks — and the manifest is the in-process one (rows, tokens, rejects by reason, kept documents per input)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from kcpt import storage
from kcpt.config import DatasetConfig, load_config
from kcpt.data.prepare import prepare_dataset
from kcpt.data.ray_pipeline import prepare_dataset_ray, read_prepared
from kcpt.data.rejects import RejectReport
from kcpt.data.shards import MANIFEST, fetch_prepared, read_manifest, read_rows
from kcpt.data.sources import BadLine, LineRange, iter_text_lines
from kcpt.errors import InputError
from kcpt.model.tokenizer import load_tokenizer

SYLLABLES = "가나다라마바사아자차카타파하고노도로모보소오조호구누두루무부수우주기니디리미비시이지치히강산물길봄"
BLOCK = 4 << 10  # bytes per read task: big.jsonl (~85 KB) becomes 21, c.parquet 3 (one per row group)


def _doc(rng: random.Random) -> str:
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(rng.randint(25, 45))]
    return " ".join(words) + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[Path], dict]:
    """a.jsonl, big.jsonl (bad lines, CRLF, duplicates of a.jsonl and of itself in other ranges), c.parquet (3 row
    groups, a null, a duplicate of big.jsonl), d.txt (a copy of an a.jsonl document): 5 duplicates, each example
    kept in the manifest; text not in the demo corpus."""
    rng = random.Random(8)
    d = tmp_path_factory.mktemp("scale")
    docs = [_doc(rng) for _ in range(320)]
    a = docs[:20]
    big_lines = [json.dumps({"text": t}, ensure_ascii=False) for t in docs[20:300]]
    big_lines[100] = json.dumps({"text": a[5]}, ensure_ascii=False)  # copy of a.jsonl:6 (kept: a.jsonl's)
    big_lines[260] = json.dumps({"text": a[6]}, ensure_ascii=False)
    big_lines[275] = big_lines[40]  # line 276 repeats line 41: another read task, the later line is the duplicate
    big_lines[56] = '{"text": "깨진 줄'  # bad_json
    big_lines[122] = json.dumps({"body": docs[1]}, ensure_ascii=False)  # missing_field 'text'
    big_lines[199] = ""  # blank line (notice)
    raw = [(ln + ("\r\n" if i in (29, 249) else "\n")).encode("utf-8") for i, ln in enumerate(big_lines)]
    raw[150] = b'{"text": "\xff\xfe bad bytes"}\n'  # invalid_utf8
    (d / "big.jsonl").write_bytes(b"".join(raw))
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in a),
                               encoding="utf-8")
    col = docs[300:320] + [None, docs[25]] + [_doc(rng) for _ in range(38)]  # row 22 repeats big.jsonl:6
    pq.write_table(pa.table({"text": pa.array(col, pa.string())}), d / "c.parquet", row_group_size=20)
    (d / "d.txt").write_text(a[3], encoding="utf-8")
    paths = [d / "a.jsonl", d / "big.jsonl", d / "c.parquet", d / "d.txt"]
    cfg = load_config(None, ["data.seq_len=128"])
    tok = load_tokenizer(cfg.tokenizer)
    ds = DatasetConfig(kind="raw", inputs=[str(p) for p in paths])
    local = prepare_dataset("scale", ds, cfg, d / "local", tok, progress=False)
    return paths, {"cfg": cfg, "tok": tok, "local": read_manifest(local), "local_dir": local}


@pytest.fixture(scope="module")
def ray_s3(s3_server):
    """Ray started after the S3 endpoint is in the environment, so the tasks reach it."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield s3_server
    ray.shutdown()


def _tokens(directory, pad_id: int) -> Counter:
    c: Counter = Counter()
    for ids in read_rows(directory)["input_ids"].to_pylist():
        c.update(t for t in ids if t != pad_id)
    return c


def _same_manifest(mr: dict, ml: dict, dir_r: str, dir_l: str) -> None:
    assert ml["rejects"] == {"bad_json": 1, "duplicate": 5, "invalid_utf8": 1, "missing_field": 2}
    assert mr["rejects"] == ml["rejects"] and mr["notices"] == ml["notices"]
    assert [i["documents"] for i in mr["inputs"]] == [i["documents"] for i in ml["inputs"]] == [20, 273, 58, 0]
    assert [i["sha256"] for i in mr["inputs"]] == [i["sha256"] for i in ml["inputs"]]
    for key in ("rows", "tokens", "segments", "label_tokens", "padding"):
        assert mr[key] == ml[key], key
    # every example names the same file:line (absolute line numbers across read tasks) and the same kept copy
    for reason in ml["rejects"]:
        assert sorted(m.replace(dir_r, "") for m in mr["reject_examples"][reason]) == \
            sorted(m.replace(dir_l, "") for m in ml["reject_examples"][reason]), reason


def test_line_ranges_read_every_line_once_with_its_number(tmp_path):
    """Cut a file at every byte (inside UTF-8 sequences, CRLFs, a too-long line): two ranges give the whole file's
    lines, numbered as read whole (the first number of a range = 2 + newlines before byte start - 1)."""
    f = tmp_path / "t.jsonl"
    f.write_bytes("하나\r\n\n둘 둘\nxxxxxxxxxxxxxxxxxxxxxxxxx\n셋\n".encode() + b"\xff\n" + "넷".encode())
    data = f.read_bytes()

    def lines(span=LineRange()):
        out = []
        for item in iter_text_lines(f, report=RejectReport(), max_line_chars=8, span=span, on_crlf=lambda n: None):
            out.append((item.lineno, item.reason) if isinstance(item, BadLine) else item)
        return out

    whole = lines()
    assert [n for n, _ in whole] == list(range(1, 8)) and whole[3] == (4, "line_too_long")
    assert whole[5] == (6, "invalid_utf8")
    for cut in range(1, len(data)):
        first = 2 + data[:cut - 1].count(b"\n")
        assert lines(LineRange(0, cut)) + lines(LineRange(cut, None, first)) == whole, cut


def test_big_file_is_split_and_manifest_matches_in_process(ray_s3, corpus, tmp_path):
    paths, ref = corpus
    ds = DatasetConfig(kind="raw", inputs=[str(p) for p in paths])
    out = prepare_dataset_ray("scale", ds, ref["cfg"], tmp_path / "ray", ref["tok"], progress=False,
                              block_bytes=BLOCK, actors=1, dedup_shards=4)
    mr, ml = read_manifest(out), ref["local"]
    a_tasks, big_tasks = (-(-p.stat().st_size // BLOCK) for p in paths[:2])
    run = mr["ray_data"]
    assert big_tasks == 21 and run["read_tasks"] == a_tasks + big_tasks + 3 + 1  # JSONL ranges, c's row groups, d
    assert run["tokenizer_actors"] == 1 < run["tokenize_batches"]  # one tokenizer load served every batch
    sizes = run["dedup_shard_sizes"]  # the digests are spread over the shards; none holds them all
    assert len(sizes) == 4 and sum(sizes) == 20 + 273 + 58 + 0 and max(sizes) < sum(sizes) / 2
    _same_manifest(mr, ml, f"{paths[0].parent}/", f"{paths[0].parent}/")
    assert _tokens(out, ref["tok"].pad_token_id) == _tokens(ref["local_dir"], ref["tok"].pad_token_id)
    assert read_prepared(out).count() == mr["rows"]


def test_uri_inputs_read_by_tasks_and_output_published_manifest_last(ray_s3, corpus, s3_prefix):
    paths, ref = corpus
    store = storage.Store(s3_prefix)
    for p in paths:
        store.upload_file(p, f"in/{p.name}")
    ds = DatasetConfig(kind="raw", inputs=[f"{s3_prefix}/in/{p.name}" for p in paths])
    bad = DatasetConfig(kind="raw", inputs=[f"{s3_prefix}/in/big.jsonl"])
    strict = load_config(None, ["data.seq_len=128", "data.strict=true"])
    with pytest.raises(InputError, match=r"big.jsonl: line (57|123|151): "):  # a failed run publishes nothing
        prepare_dataset_ray("scale", bad, strict, f"{s3_prefix}/out", ref["tok"], progress=False, block_bytes=BLOCK)
    assert store.walk("out") == {}
    out = prepare_dataset_ray("scale", ds, ref["cfg"], f"{s3_prefix}/out", ref["tok"], progress=False,
                              block_bytes=BLOCK, actors=1)
    assert out == f"{s3_prefix}/out" and not storage.local_path_for(f"{s3_prefix}/in").exists()  # no download
    names = store.walk("out")
    mr = json.loads(store.read_text(f"out/{MANIFEST}"))
    assert mr["shards"] == sorted(n for n in names if n.endswith(".parquet")) and mr["ray_data"]["read_tasks"] > 20
    _same_manifest(mr, ref["local"], f"{s3_prefix}/in/", f"{paths[0].parent}/")
    assert read_prepared(out).count() == mr["rows"]
    local = fetch_prepared(out)
    assert _tokens(local, ref["tok"].pad_token_id) == _tokens(ref["local_dir"], ref["tok"].pad_token_id)
    with pytest.raises(InputError, match="already holds files"):
        prepare_dataset_ray("scale", ds, ref["cfg"], out, ref["tok"], progress=False)
    small = DatasetConfig(kind="raw", inputs=[f"{s3_prefix}/in/d.txt"])  # replaces it: the old shards are gone
    prepare_dataset_ray("small", small, ref["cfg"], out, ref["tok"], progress=False, overwrite=True)
    m2 = json.loads(store.read_text(f"out/{MANIFEST}"))
    assert m2["name"] == "small" and sorted(n for n in store.walk("out") if n.endswith(".parquet")) == m2["shards"]


def test_prepare_all_with_a_uri_root_writes_there_directly(ray_s3, corpus, s3_prefix):
    """data.ray_data + a URI prepared_root: the tasks write the dataset at the URI (manifest last); the node-local
    mirror keeps only its manifest and tokenizer (for the cache index); a second call reuses it."""
    from kcpt.data.prepare import prepare_all

    paths, ref = corpus
    cfg = load_config(None, ["data.seq_len=128", "data.ray_data=true", f"data.prepared_root={s3_prefix}/prepared",
                             "logging.progress=false"])
    cfg.data.datasets = {"small": DatasetConfig(kind="raw", inputs=[str(paths[0]), str(paths[3])])}
    statuses: dict[str, str] = {}
    uri = prepare_all(cfg, statuses=statuses)["small"]
    assert statuses == {"small": "prepared"} and str(uri).startswith(f"{s3_prefix}/prepared/small-")
    store, rel = storage.store_and_rel(str(uri))
    m = json.loads(store.read_text(f"{rel}/{MANIFEST}"))
    assert m["pipeline"] == "ray_data" and m["rejects"] == {"duplicate": 1} and m["rows"] > 0
    assert sorted(n for n in store.walk(rel) if n.endswith(".parquet")) == m["shards"]
    mirror = storage.local_path_for(str(uri))
    assert (mirror / MANIFEST).is_file() and not list(mirror.glob("*.parquet"))
    assert prepare_all(cfg, statuses=statuses)["small"] == uri and statuses == {"small": "reused"}
    assert read_rows(fetch_prepared(uri)).num_rows == m["rows"]  # the shards are fetched on demand
