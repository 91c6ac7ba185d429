"""Cheap cache keys: finding prepared data reads no input byte (the key is (path, size, mtime_ns) + settings);
the content hash is computed once, at prepare time, and kept in the manifest.

"No byte read" is observed, not inferred: the kernel's inotify reports every open() and read() of the input
file, by any process (it works for root, unlike ``chmod 000``), and each test first shows that the watch does
see a read (the hashing after a change of mtime) before asserting that it sees none.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from pathlib import Path

import pytest

from kcpt.config import load_config
from kcpt.data.demo import konlpy_corpus_dir
from kcpt.data.prepare import KEYS_DIR, prepare_all, stat_key
from kcpt.data.shards import prepared_sha256, read_manifest
from kcpt.data.sources import input_stat
from kcpt.hashing import sha256_file

IN_ACCESS, IN_OPEN = 0x1, 0x20
TEXT = (konlpy_corpus_dir() / "kolaw" / "constitution.txt").read_text(encoding="utf-8")


class Watch:
    """inotify watch on one file: :meth:`events` returns (and clears) the open/read events seen since."""

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0 and libc.inotify_add_watch(self.fd, os.fsencode(path), IN_ACCESS | IN_OPEN) >= 0

    def events(self) -> list[int]:
        masks: list[int] = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return masks
            off = 0
            while off < len(buf):
                _, mask, _, n = struct.unpack_from("iIII", buf, off)
                masks.append(mask)
                off += 16 + n

    def close(self) -> None:
        os.close(self.fd)


def _docs(n: int, salt: str = "") -> str:
    chunks = [TEXT[i * 300:(i + 1) * 300] for i in range(n)]
    return "".join(json.dumps({"text": f"{salt}{c}"}, ensure_ascii=False) + "\n" for c in chunks)


def _cfg(tmp_path: Path, inp: Path, *extra: str):
    cfg = load_config(None, [f"data.prepared_root={tmp_path / 'prepared'}", "logging.progress=false",
                             "data.seq_len=64", *extra])
    cfg.data.datasets["raw_train"].inputs = [str(inp)]
    return cfg


def test_second_prepare_reads_no_input_byte_and_mtime_or_size_invalidate(tmp_path: Path) -> None:
    inp = tmp_path / "corpus.jsonl"
    inp.write_text(_docs(6), encoding="utf-8")
    cfg = _cfg(tmp_path, inp)
    first = prepare_all(cfg, ["raw_train"])["raw_train"]
    manifest = read_manifest(first)
    assert manifest["inputs"][0]["sha256"] == sha256_file(inp)  # the content hash, kept in the manifest
    data_sha = prepared_sha256(first)
    watch = Watch(inp)
    try:
        assert prepare_all(cfg, ["raw_train"])["raw_train"] == first
        assert watch.events() == []  # unchanged inputs: not opened, not read
        # a new mtime, same bytes: the stat key misses, the input is hashed (the watch sees it) and the same
        # prepared directory is found by content: not prepared again, checkpoints' data_sha256 unchanged
        st = inp.stat()
        os.utime(inp, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert prepare_all(cfg, ["raw_train"])["raw_train"] == first
        assert any(m & IN_ACCESS for m in watch.events())
        assert prepared_sha256(first) == data_sha
        assert len(list((tmp_path / "prepared" / KEYS_DIR).glob("raw_train-*.json"))) == 2
        assert prepare_all(cfg, ["raw_train"])["raw_train"] == first and watch.events() == []
        # new content (size changes): a new prepared directory whose manifest has the new content hash
        inp.write_text(_docs(7), encoding="utf-8")
        changed = prepare_all(cfg, ["raw_train"])["raw_train"]
        assert changed != first and read_manifest(changed)["inputs"][0]["sha256"] == sha256_file(inp)
        assert read_manifest(changed)["rows"] > manifest["rows"]
    finally:
        watch.close()


def test_the_same_inputs_prepared_again_elsewhere_keep_the_identity_checkpoints_record(tmp_path: Path) -> None:
    """A lost cache, a fresh node or another prepared_root prepares the same data again: a new manifest (another
    time, other paths) whose identity must stay, or every resume would be refused for "changed" data."""
    import shutil
    import time

    inp = tmp_path / "corpus.jsonl"
    inp.write_text(_docs(6), encoding="utf-8")
    first = prepare_all(_cfg(tmp_path, inp), ["raw_train"])["raw_train"]
    ident = prepared_sha256(first)
    time.sleep(1.1)  # the manifest's `created` is in seconds
    moved = tmp_path / "elsewhere" / "corpus.jsonl"
    moved.parent.mkdir()
    shutil.copy(inp, moved)
    cfg = _cfg(tmp_path / "node2", moved)
    again = prepare_all(cfg, ["raw_train"])["raw_train"]
    a, b = read_manifest(first), read_manifest(again)
    assert a["created"] != b["created"] and a["inputs"][0]["path"] != b["inputs"][0]["path"]
    assert prepared_sha256(again) == ident
    other = prepare_all(_cfg(tmp_path / "node3", moved, "data.filters.min_chars=30"), ["raw_train"])["raw_train"]
    assert prepared_sha256(other) != ident  # other rows (another filter), another identity


def test_stat_key_follows_size_and_mtime_of_each_walked_file_only(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text(_docs(2), encoding="utf-8")
    (d / "sub" / "b.txt").write_text("가나다라마바사", encoding="utf-8")
    cfg = _cfg(tmp_path, d)
    ds = cfg.data.datasets["raw_train"]
    key = stat_key("raw_train", ds, cfg, "tok", [d])
    assert [e[0] for e in input_stat(d)] == ["a.jsonl", "sub/b.txt"]
    (d / "notes.md").write_text("not an input")  # a file the walk skips: no effect
    assert stat_key("raw_train", ds, cfg, "tok", [d]) == key
    b = d / "sub" / "b.txt"
    st = b.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert stat_key("raw_train", ds, cfg, "tok", [d]) != key
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stat_key("raw_train", ds, cfg, "tok", [d]) == key
    b.write_text("가나다라마바사아", encoding="utf-8")
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stat_key("raw_train", ds, cfg, "tok", [d]) != key  # size alone
    assert stat_key("raw_train", ds, cfg.model_copy(update={"data": cfg.data.model_copy(update={"seq_len": 32})}),
                    "tok", [d]) != stat_key("raw_train", ds, cfg, "tok", [d])  # the prepare config is in the key


def test_training_run_on_unchanged_inputs_reads_no_input_byte(tmp_path: Path) -> None:
    """What a second run, or every tune trial, does before training: run_plan's prepare + manifest binding."""
    from kcpt.train.launch import run_plan

    inp = tmp_path / "corpus.jsonl"
    inp.write_text(_docs(6), encoding="utf-8")
    plan = "[{name: s, sources: {raw_train: 1.0}, max_steps: 2, eval_every: 2, stop: {rule: max_steps}}]"
    cfg = _cfg(tmp_path, inp, "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
               "model.tiny.intermediate_size=64", "train.micro_batch_size=4", "train.max_eval_rows=16",
               "train.num_workers=1", "logging.tensorboard=false", f"train.output_dir={tmp_path / 'runs'}",
               "tune.stage=s", f"plan={plan}")
    first = run_plan(cfg, resume="never", in_process=True)
    watch = Watch(inp)
    try:
        again = run_plan(cfg, run_dir=tmp_path / "runs" / "second", resume="never", in_process=True)
        assert watch.events() == []
        inp.read_bytes()
        assert watch.events(), "the watch sees a read"  # the assertion above could fail
    finally:
        watch.close()
    assert again.summaries["s"]["steps"] == first.summaries["s"]["steps"] == 2


@pytest.mark.parametrize("kind", ["raw_val", "qa_val"])
def test_demo_inputs_are_cached_by_stat_key_too(tmp_path: Path, kind: str) -> None:
    cfg = load_config(None, [f"data.prepared_root={tmp_path}", "logging.progress=false"])
    first = prepare_all(cfg, [kind])[kind]
    assert prepare_all(cfg, [kind])[kind] == first
    assert len(list((tmp_path / KEYS_DIR).glob(f"{kind}-*.json"))) == 1
