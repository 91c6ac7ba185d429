"""A held-out set that shares exam questions or input files with a training source is said (or refused) before
training: each dataset dedups only itself, so nothing caught a question copied into both sides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kcpt.config import load_config
from kcpt.data.demo import konlpy_corpus_dir
from kcpt.data.prepare import prepare_all
from kcpt.errors import InputError
from kcpt.train.plan import datasets_needed, held_out_warnings

BILLS = sorted((konlpy_corpus_dir() / "kobill").glob("*.txt"))


def _jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def leaky(tmp_path_factory) -> tuple[list[str], Path]:
    """Overrides for a user's data with two leaks: exam_val's line 2 asks qa_train's line 1 question again (another
    id, other whitespace, another answer), and raw_val reads a copy of one of raw_train's files."""
    d = tmp_path_factory.mktemp("leaky")
    q = "대한민국의 수도는 어디인가?"
    train = _jsonl(d / "qa_train.jsonl", [
        {"id": "q1", "question": q, "choices": ["서울", "부산"], "answer": "서울", "kind": "qa"},
        {"id": "q2", "question": "국회의 임기는 몇 년인가?", "answer": "4년", "kind": "qa"},
    ])
    held = _jsonl(d / "exam_val.jsonl", [
        {"id": "v1", "question": "대통령의 임기는 몇 년인가?", "answer": "5년", "kind": "qa"},
        {"id": "v2", "question": "대한민국의  수도는 어디인가? ", "choices": ["서울", "부산"], "answer": "부산",
         "kind": "qa"},
    ])
    copy = d / "val" / "bill.txt"  # a copy of a training file under another name: compared by content
    copy.parent.mkdir()
    copy.write_text(BILLS[0].read_text(encoding="utf-8"), encoding="utf-8")
    datasets = (f"{{raw_train: {{kind: raw, inputs: {[str(b) for b in BILLS[:4]]}}}, "
                f"raw_val: {{kind: raw, inputs: ['{copy}']}}, "
                f"raw_val_ok: {{kind: raw, inputs: ['{BILLS[5]}']}}, "
                f"qa_train: {{kind: exam, inputs: ['{train}']}}, exam_val: {{kind: exam, inputs: ['{held}']}}}}")
    plan = ("[{name: s, sources: {qa_train: 0.5, raw_train: 0.5}, max_steps: 2, eval_every: 1, eval_exam: exam_val, "
            "stop: {rule: max_steps}}]")
    over = [f"data.datasets={datasets}", f"plan={plan}", "tune.stage=s", "data.seq_len=64",
            f"data.prepared_root={d / 'prepared'}", "logging.progress=false", "model.tiny.hidden_size=32",
            "model.tiny.num_layers=1", "model.tiny.num_heads=2", "model.tiny.intermediate_size=64",
            "train.num_workers=1", "train.micro_batch_size=1", f"train.output_dir={d / 'runs'}"]
    return over, train


def test_shared_questions_and_input_files_are_named_by_file_and_line(leaky):
    over, train = leaky
    cfg = load_config(None, over)
    prepared = prepare_all(cfg, datasets_needed(cfg, ["s"]))
    lines = held_out_warnings(cfg, ["s"], prepared)
    assert len(lines) == 2, lines
    exam = next(ln for ln in lines if ln.startswith("warning: exam_val"))
    held_file = str(Path(train).parent / "exam_val.jsonl")
    assert f"exam_val (held out): 1 of its 2 exam questions are also in qa_train (trained on), e.g. " \
           f"{held_file} line 2 = {train} line 1" in exam
    raw = next(ln for ln in lines if ln.startswith("warning: raw_val"))
    copy = Path(train).parent / "val" / "bill.txt"
    assert f"raw_val (held out) and raw_train (trained on) read the same input file: {copy} = {BILLS[0]}" in raw
    assert "Remove the shared items from one side" in raw
    # another held-out raw set with its own text: nothing to say
    clean = load_config(None, [*over, "plan.0.eval_raw=raw_val_ok"])
    assert [ln for ln in held_out_warnings(clean, ["s"], prepare_all(clean, datasets_needed(clean, ["s"])))
            if ln.startswith("warning: raw_val")] == []
    assert held_out_warnings(load_config(None, [*over, "data.held_out_overlap=ignore"]), ["s"], prepared) == []
    both = load_config(None, [*over, "plan.0.sources={qa_train: 0.4, raw_train: 0.4, exam_val: 0.2}"])
    assert held_out_warnings(both, ["s"], prepared)[0].startswith(
        "warning: exam_val is held out (an eval set) and trained on (a source) in the same stages")


def test_held_out_overlap_error_stops_a_run_before_it_trains(leaky, capsys):
    """The wiring: ``run_plan`` checks after preparing (the error before any step), and the tune job's data table
    (``show_data``) prints the warnings."""
    from kcpt.train.launch import run_plan
    from kcpt.tune.launch import show_data

    over, train = leaky
    with pytest.raises(InputError, match=r"data.held_out_overlap=error: .*exam_val \(held out\): 1 of its 2 exam "
                                         r"questions are also in qa_train"):
        run_plan(load_config(None, [*over, "data.held_out_overlap=error"]), resume="never", in_process=True)
    assert not list((Path(train).parent / "runs").rglob("metrics.jsonl"))  # nothing trained
    show_data(load_config(None, over), ["s"])
    out = capsys.readouterr().out
    assert "warning: exam_val (held out): 1 of its 2 exam questions" in out
