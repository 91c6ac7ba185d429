"""The embedded demo corpus: determinism, disjoint splits, both exam kinds, and it passes its own checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kcpt.config import FilterConfig
from kcpt.data import demo
from kcpt.data.cleaning import clean_documents
from kcpt.data.exam_io import read_exam_items
from kcpt.data.rejects import RejectReport
from kcpt.data.sources import read_documents
from kcpt.errors import InputError


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return demo.build_demo_corpus(tmp_path_factory.mktemp("demo") / "a")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_konlpy_files_found_without_java() -> None:
    corpus = demo.konlpy_corpus_dir()
    assert (corpus / "kolaw" / "constitution.txt").is_file()
    assert len(list((corpus / "kobill").glob("*.txt"))) == 10


def test_build_is_deterministic_and_cached(built: dict[str, Path], tmp_path: Path) -> None:
    again = demo.build_demo_corpus(tmp_path / "b")
    assert set(built) == set(demo.SPLITS)
    for split in demo.SPLITS:
        assert built[split].read_bytes() == again[split].read_bytes(), split
    stamp = again["raw_train"].stat().st_mtime_ns
    assert demo.build_demo_corpus(tmp_path / "b")["raw_train"].stat().st_mtime_ns == stamp  # reused


def test_raw_splits_disjoint_by_document(built: dict[str, Path]) -> None:
    train, val = _records(built["raw_train"]), _records(built["raw_val"])
    assert {d["id"] for d in train}.isdisjoint({d["id"] for d in val})
    assert {d["text"] for d in train}.isdisjoint({d["text"] for d in val})
    chars_val = sum(len(d["text"]) for d in val)
    frac = chars_val / (chars_val + sum(len(d["text"]) for d in train))
    assert 0.10 <= frac <= 0.15 and len(train) >= 15
    assert any(d["id"].startswith("bill-") for d in train) and any(d["id"].startswith("constitution-") for d in val)
    rep = RejectReport()  # the demo passes the default filters untouched
    kept = list(clean_documents(read_documents([built["raw_train"], built["raw_val"]], report=rep),
                                FilterConfig(), rep))
    assert rep.total == 0 and len(kept) == len(train) + len(val)


def test_exam_splits(built: dict[str, Path]) -> None:
    rep = RejectReport()
    items = {s: list(read_exam_items([built[s]], report=rep, strict=True)) for s in demo.EXAM_SPLITS}
    assert rep.total == 0
    assert {i.kind for i in items["qa_train"] + items["qa_val"]} == {"qa"}
    assert {i.kind for i in items["example_train"] + items["example_val"]} == {"example"}
    assert any(i.choices for i in items["example_val"]) and any(i.prompt for i in items["example_train"])
    for kind in ("qa", "example"):
        tr, va = items[f"{kind}_train"], items[f"{kind}_val"]
        assert {i.id for i in tr}.isdisjoint({i.id for i in va})
        assert 0.08 <= len(va) / (len(tr) + len(va)) <= 0.25
    total = sum(len(v) for v in items.values())
    assert 300 <= total <= 1000
    for it in (i for v in items.values() for i in v):
        size = len(it.prompt or it.question) + sum(len(c) for c in it.choices or []) + len(it.answer)
        assert size <= 200, it.id
        if it.choices:
            assert it.answer in it.choices and len(it.choices) == 4
    # Held out by subject: no article/bill has items in both train and val.
    def subjects(split: str) -> set[str]:
        return {re.sub(r"^(qa|ex)-|-(p\d+|which|content|blank|title|reason|date|proposer)$", "", i.id)
                for i in items[split]}

    assert subjects("qa_train").isdisjoint(subjects("qa_val"))
    assert subjects("example_train").isdisjoint(subjects("example_val"))
    assert "const-addenda-1" in subjects("qa_train") | subjects("qa_val")
    # No exam item answers with held-out raw text: raw val measures retention, not memorised answers.
    raw_val_text = " ".join(d["text"] for d in _records(built["raw_val"])).replace("\n", " ")
    for split in demo.EXAM_SPLITS:
        leaked = [i.id for i in items[split] if len(i.answer) >= 20 and i.answer[:20] in raw_val_text]
        assert leaked == [], leaked[:5]


def test_statistics_and_resolve_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KCPT_CACHE_DIR", str(tmp_path / "cache"))
    paths = demo.resolve_inputs(["demo:qa_val", str(tmp_path)])
    assert paths[0].parent.parent == tmp_path / "cache" and paths[0].name == "qa_val.jsonl" and paths[1] == tmp_path
    stats = demo.demo_statistics()
    assert stats["raw"]["raw_val"]["docs"] == len(_records(paths[0].parent / "raw_val.jsonl"))
    assert stats["exam"]["qa_val"]["items"] == stats["exam"]["qa_val"]["by_kind"]["qa"] == len(_records(paths[0]))
    with pytest.raises(InputError, match="unknown demo split 'raw_test'"):
        demo.resolve_inputs(["demo:raw_test"])
    with pytest.raises(InputError, match="does not exist") as e:
        demo.resolve_inputs([str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl" in str(e.value)
