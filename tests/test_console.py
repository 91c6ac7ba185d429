"""The console a person reads (issue 14): the data table and its warnings, the reject limit, kcpt's lines only.

Fast tests check the pieces (the seq_len fix from recorded lengths, the warning threshold, the limit, the console
renderers); the end-to-end tests capture the real console (a subprocess, not a terminal) of the demo plan run
small with a QA dataset that loses most of its items to ``answer_truncated`` (one run, read by two tests), and of
a worker that raises, and assert the table, the warning (with the seq_len computed from the item lengths), the
worker's traceback and the absence of Ray's internals.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kcpt.console import Console, eval_line
from kcpt.data.rejects import RejectReport
from kcpt.data.report import (
    DatasetReport,
    check_reject_limit,
    data_table,
    data_warnings,
    seq_len_fix,
)
from kcpt.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
RAY_INTERNALS = ["core_worker", "PreemptionWatcher", "Checkpoint successfully created", "placement group",
                 "RayTrainWorker pid", "TrainController pid", "Configuration for experiment", "Trial status",
                 "Started a local Ray instance", "View detailed results"]
TINY = ["train.num_workers=1", "logging.tensorboard=false", "train.max_eval_rows=32",
        *(f"plan.{i}.{k}" for i in range(4) for k in ("max_steps=2", "eval_every=2"))]


def exam_manifest(kept: int, truncated: dict[int, int], seq_len: int = 64, other: dict[str, int] | None = None):
    return {"kind": "exam", "seq_len": seq_len, "rows": 3, "tokens": 150, "pack_efficiency": 0.78,
            "inputs": [{"path": "x.jsonl", "documents": kept}],
            "rejects": {"answer_truncated": sum(truncated.values()), **(other or {})},
            "reject_lengths": {"answer_truncated": {str(k): v for k, v in truncated.items()}}}


# --------------------------------------------------------------------------- pieces


def test_seq_len_fix_covers_the_named_fraction():
    # 27 kept (fit 64), 63 dropped with lengths 70, 72, …, 194: 95 % of 90 → 86 items → 59 dropped must fit → the
    # 59th length is 186 → rounded up to a multiple of 8: N = 192, which fits 62 dropped: 89 of 90 items
    r = DatasetReport("qa", exam_manifest(27, {70 + 2 * i: 1 for i in range(63)}))
    n, p, n_all = seq_len_fix(r)
    assert (n, n_all) == (192, 200) and math.isclose(p, 89 / 90)
    (w,) = data_warnings([r])
    assert "qa: 63 of 90 items (70%) dropped as answer_truncated" in w
    assert "data.seq_len=192 covers 99% of the items (200 covers all)" in w


def test_warning_threshold_raw_over_10_percent_exam_any():
    raw = {"kind": "raw", "rows": 1, "tokens": 1, "pack_efficiency": 1.0, "inputs": [{"documents": 90}],
           "rejects": {"hangul_ratio": 13, "too_short": 9}}  # 11.6 % and 8.0 % of 112
    ws = data_warnings([DatasetReport("raw", raw)], {"min_hangul_ratio": 0.3})
    assert len(ws) == 1 and "dropped as hangul_ratio" in ws[0] and "data.filters.min_hangul_ratio=0.3" in ws[0]
    one_exam = DatasetReport("ex", exam_manifest(99, {}, other={"duplicate_id": 1}))
    assert any("1 of 100 items (1%) dropped as duplicate_id" in w for w in data_warnings([one_exam]))
    assert data_warnings([DatasetReport("ok", exam_manifest(10, {}))]) == []


def test_old_manifest_without_lengths_still_warns():
    m = exam_manifest(1, {100: 3})
    del m["reject_lengths"]
    (w,) = data_warnings([DatasetReport("qa", m)])
    assert "raise data.seq_len" in w and "not recorded" in w


def test_reject_limit_names_dataset_reason_fraction_limit():
    r = DatasetReport("qa", exam_manifest(27, {100: 63}))
    check_reject_limit([r], None)
    check_reject_limit([r], 0.8)
    with pytest.raises(InputError, match=r"dataset 'qa' dropped 70\.0% of its 90 items as answer_truncated, "
                                         r"above the limit 0\.5"):
        check_reject_limit([r], 0.5)
    spread = DatasetReport("qa", exam_manifest(40, {100: 20}, other={"duplicate_id": 20, "bad_choices": 20}))
    check_reject_limit([spread], 0.8)  # 60 of 100 dropped, each reason 20 %
    with pytest.raises(InputError, match=r"dataset 'qa' dropped 60\.0% of its 100 items \(answer_truncated 20, "
                                         r"duplicate_id 20, bad_choices 20\), above the limit 0\.5"):
        check_reject_limit([spread], 0.5)


def test_items_of_another_kind_are_noted_under_the_table():
    m = {**exam_manifest(5, {}), "notices": {"other_kind": 11}, "dataset": {"inputs": ["x.jsonl"], "exam_kind": "qa"}}
    (line,) = data_warnings([DatasetReport("qa_val", m)])
    assert line == ("note: qa_val: 11 items of another kind than 'qa' were skipped (data.datasets.qa_val.exam_kind); "
                    "they are not in the read column")


def test_a_plan_mixing_demo_and_own_inputs_is_warned_naming_the_demo_datasets():
    def m(inputs):
        return {**exam_manifest(5, {}), "dataset": {"inputs": inputs}}

    mine = DatasetReport("raw_train", m(["corpus.jsonl"]))
    assert data_warnings([mine, DatasetReport("exam_val", m(["val.jsonl"]))]) == []
    assert data_warnings([DatasetReport("raw_train", m(["demo:raw_train"])),
                          DatasetReport("raw_val", m(["demo:raw_val"]))]) == []
    (w,) = data_warnings([mine, DatasetReport("raw_val", m(["demo:raw_val"])), DatasetReport("x", m(["demo:x"]))])
    assert w.startswith("warning: raw_val, x read the embedded demo data while raw_train reads other inputs")
    assert "--set 'data.datasets.raw_val.inputs=[path/to/raw_val.jsonl]'" in w


def test_table_has_one_line_per_dataset_with_cache_status():
    t = data_table([DatasetReport("qa", exam_manifest(27, {100: 63}), "reused"),
                    DatasetReport("qb", exam_manifest(5, {}), "prepared")])
    head, _, qa, qb = t.splitlines()
    assert head.split() == ["dataset", "kind", "read", "kept", "rejected", "rows", "tokens", "pack", "cache"]
    assert qa.split()[:4] == ["qa", "exam", "90", "27"] and "answer_truncated 63" in qa and qa.endswith("reused")
    assert qb.endswith("prepared")


def test_truncated_lengths_are_recorded_and_merge():
    from kcpt.config import ExamTemplate
    from kcpt.data.exam import encode_exam_items
    from kcpt.data.types import ExamItem
    from kcpt.model.tokenizer import load_demo_tokenizer

    tok = load_demo_tokenizer(8192)
    items = [ExamItem(id=str(i), question="질문", answer="대한민국 헌법 " * (i + 1), kind="qa") for i in range(6)]
    rep = RejectReport()
    kept = list(encode_exam_items(items, tok, ExamTemplate(), 16, report=rep))
    hist = rep.lengths["answer_truncated"]
    assert sum(hist.values()) == rep.counts["answer_truncated"] == 6 - len(kept) > 0
    assert min(hist) > 16
    other = RejectReport.from_dict(rep.to_dict())
    other.merge(rep)
    assert sum(other.lengths["answer_truncated"].values()) == 2 * sum(hist.values())


def test_console_plain_lines_and_bars():
    out = io.StringIO()
    c = Console(stream=out, bars=False)
    m = {"stage": "s", "step": 2, "train_loss": 1.0, "raw_val_loss": 2.0, "exam_val_loss": None, "lr": 1e-3,
         "gate_ok": True, "gate_streak": 1, "stop": False}
    c.handle({"kind": "stage_start", "stage": "s", "step": 0, "max_steps": 4})
    c.handle({"kind": "eval", "metrics": m})
    c.handle({"kind": "stage_end", "summary": {"stage": "s", "passed": True, "stop_reason": "gate", "steps": 2,
                                               "best_step": 2, "best_checkpoint": "/ck/2"}})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(eval_line(m)) and "[2/4 eta" in lines[0]
    assert lines[1] == "[s] passed: gate after 2 steps; best step 2 (raw -, exam -); hands off /ck/2"
    bar = io.StringIO()
    c = Console(stream=bar, bars=True)
    c.handle({"kind": "stage_start", "stage": "s", "step": 0, "max_steps": 4})
    c.handle({"kind": "progress", "stage": "s", "step": 1, "tokens": 512})
    c.handle({"kind": "eval", "metrics": m})
    c.close()
    text = bar.getvalue()
    assert "[s]" in text and "2/4" in text and "tok 512" in text and "gate ×1" in text and eval_line(m) in text


def test_tune_console_counts_done_running_pruned_best():
    from kcpt.tune.progress import TuneConsole
    from kcpt.tune.searcher import DONE_KEY, FINAL_KEY

    out = io.StringIO()
    tc = TuneConsole(3, stream=out, bars=False)
    a, b = (SimpleNamespace(trial_id=t, config={"lr": 0.001}, last_result={"step": 4, "exam_val_loss": 8.0,
                                                                           "raw_ratio": 0.99}) for t in "ab")
    tc.on_trial_start(0, [], a)
    tc.on_trial_start(0, [], b)
    tc.on_trial_complete(0, [], b)  # no final summary: the scheduler stopped it
    tc.on_trial_result(0, [], a, {FINAL_KEY: True, "gate_objective": 7.5, "gate_feasible": True,
                                  "selected_step": 8, "selected_raw_ratio": 0.98})
    tc.on_trial_complete(0, [], a)
    # stopped by the scheduler on the eval that ends its stage: not pruned (the searcher tells Optuna COMPLETE)
    c = SimpleNamespace(trial_id="c", config={"lr": 0.002}, last_result={})
    tc.on_trial_start(0, [], c)
    tc.on_trial_result(0, [], c, {FINAL_KEY: False, DONE_KEY: True, "step": 16, "gate_objective": 1.8,
                                  "gate_feasible": False, "selected_step": 16, "selected_raw_ratio": 1.05})
    tc.on_trial_complete(0, [], c)
    lines = out.getvalue().splitlines()
    assert "trial b pruned at step 4" in lines[2] and "1/3 done, 1 running, 1 pruned" in lines[2]
    assert "trial a feasible, objective 7.5000" in lines[3]
    assert lines[3].endswith("2/3 done, 0 running, 1 pruned, 0 failed; best feasible: a objective 7.5000")
    assert "trial c infeasible, objective 1.8000 (step 16, raw ×1.050)" in lines[5]
    assert lines[5].endswith("3/3 done, 0 running, 1 pruned, 0 failed; best feasible: a objective 7.5000")


def test_a_resumed_tune_console_counts_the_trials_that_ended_before_the_driver_died():
    """After `--resume`, Tune's restored console may predate a trial's end: it said "1/3 done" at the first trial of
    the resumed run although one had ended before. The trials Tune holds as ended count."""
    from kcpt.tune.progress import TuneConsole

    out = io.StringIO()
    tc = TuneConsole(3, stream=out, bars=False)  # as restored: no trial seen
    old = SimpleNamespace(trial_id="old", status="TERMINATED", config={}, last_result={})
    rerun = SimpleNamespace(trial_id="rerun", status="RUNNING", config={"lr": 0.001},
                            last_result={"step": 2, "exam_val_loss": 8.0, "raw_ratio": 1.0})
    tc.on_trial_start(0, [old, rerun], rerun)
    rerun.status = "TERMINATED"
    tc.on_trial_complete(0, [old, rerun], rerun)
    assert out.getvalue().splitlines()[-1].endswith("2/3 done, 0 running, 1 pruned, 0 failed; best feasible: none yet")


def test_a_resumed_tune_console_takes_the_earlier_trials_into_its_best():
    """After `--resume` the console named the re-run trial (1.7853) best, though a trial that had ended before the
    driver died was better (1.7823): the final reports of the trials Tune holds as ended count for the best."""
    from kcpt.tune.progress import TuneConsole
    from kcpt.tune.searcher import FINAL_KEY

    out = io.StringIO()
    tc = TuneConsole(2, stream=out, bars=False)  # as restored: no trial seen
    final = {FINAL_KEY: True, "gate_feasible": True, "selected_step": 20, "selected_raw_ratio": 1.0}
    old = SimpleNamespace(trial_id="old", status="TERMINATED", config={},
                          last_result={**final, "gate_objective": 1.7823})
    rerun = SimpleNamespace(trial_id="rerun", status="RUNNING", config={}, last_result={})
    tc.on_trial_start(0, [old, rerun], rerun)
    tc.on_trial_result(0, [old, rerun], rerun, {**final, "gate_objective": 1.7853})
    rerun.status = "TERMINATED"
    tc.on_trial_complete(0, [old, rerun], rerun)
    assert out.getvalue().splitlines()[-1].endswith("2/2 done, 0 running, 0 pruned, 0 failed; best feasible: old "
                                                    "objective 1.7823")


# --------------------------------------------------------------------------- the real console


def run_job(job: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # Ray's default preemption watcher (conftest turns it off elsewhere): RAY_INTERNALS names its actor
    env = {k: v for k, v in os.environ.items() if k != "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / job), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=env)


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def assert_quiet(console: str) -> None:
    for s in RAY_INTERNALS:
        assert s not in console, f"{s!r} on the console:\n{console}"


def long_answer_exam(path: Path) -> list[dict]:
    """90 QA items: 27 short answers, 63 long ones of growing length (most do not fit 64 tokens)."""
    items = [{"id": f"q{i}", "question": f"대한민국의 수도는 어디인가 {i}?", "kind": "qa",
              "answer": "서울" if i < 27 else "대한민국 헌법 제" + "일조 국민의 권리와 의무를 정한다 " * (8 + i - 27)}
             for i in range(90)]
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    return items


def expected_fix(items: list[dict], seq_len: int, prepared_root: Path) -> tuple[int, int]:
    """The seq_len covering 95 % of the items and the percentage, from the items' own encodings."""
    from transformers import AutoTokenizer

    from kcpt.config import ExamTemplate
    from kcpt.data.exam import encode_exam_item
    from kcpt.data.types import ExamItem

    (tdir,) = prepared_root.glob("tokenizer-*")
    tok = AutoTokenizer.from_pretrained(tdir)
    lengths = sorted(len(encode_exam_item(ExamItem(**it), tok, ExamTemplate(), 10**6).input_ids) for it in items)
    n = -(-lengths[math.ceil(0.95 * len(lengths)) - 1] // 8) * 8
    assert lengths[26] <= seq_len < lengths[27]  # the test's premise: 63 of 90 do not fit
    return n, round(100 * sum(x <= n for x in lengths) / len(lengths))


@pytest.fixture(scope="module")
def lossy_plan(tmp_path_factory):
    """ONE console capture read by two tests: `jobs/train_stages.py` runs the demo plan (every stage, 2 steps) on
    a fresh prepared_root, with the user's own QA set (``long_answer_exam``: 63 of 90 items do not fit
    ``data.seq_len: 64``) in place of the demo's ``qa_train``."""
    import yaml

    from kcpt.config import KcptConfig

    tmp_path = tmp_path_factory.mktemp("lossy_plan")
    items = long_answer_exam(tmp_path / "my_qa.jsonl")
    datasets = KcptConfig().model_dump(mode="json")["data"]["datasets"]
    datasets["qa_train"]["inputs"] = [str(tmp_path / "my_qa.jsonl")]  # the user's own QA set
    (tmp_path / "my.yaml").write_text(yaml.safe_dump({"data": {"datasets": datasets, "seq_len": 64}}), "utf-8")
    prepared = tmp_path / "prepared"
    base = [*TINY, f"data.prepared_root={prepared}", f"train.output_dir={tmp_path}"]
    res = run_job("train_stages.py", "--config", str(tmp_path / "my.yaml"), "--run-dir", str(tmp_path / "run"),
                  *sets(*base))
    return SimpleNamespace(res=res, root=tmp_path, items=items, prepared=prepared, base=base)


@pytest.mark.machine
@pytest.mark.slow
def test_demo_plan_console(lossy_plan):
    res = lossy_plan.res
    console = res.stdout + res.stderr
    assert res.returncode == 0, console[-3000:]
    assert_quiet(console)
    out = res.stdout.splitlines()
    start = out.index("data:")
    assert out[start + 1].split()[:4] == ["dataset", "kind", "read", "kept"]
    rows = {ln.split()[0]: ln for ln in out[start + 3:start + 8]}
    assert set(rows) == {"raw_train", "raw_val", "qa_train", "exam_val", "example_train"}
    assert all(r.endswith("prepared") for r in rows.values())  # a fresh prepared_root: prepared now
    for stage in ("cpt", "stage1", "stage2", "stage3"):
        assert sum(ln.startswith(f"[{stage}] step") for ln in out) == 2  # step 0 and step 2: one line per eval
        assert any(ln.startswith(f"[{stage}] ") and "hands off" in ln for ln in out)
    assert any(ln.startswith("stage ") and "raw best" in ln for ln in out)  # the final table
    assert res.stderr.strip() == ""


@pytest.mark.machine
@pytest.mark.slow
def test_lossy_dataset_console_warns_with_the_fix_and_limit_stops(lossy_plan):
    res, tmp_path, items, prepared = lossy_plan.res, lossy_plan.root, lossy_plan.items, lossy_plan.prepared
    console = res.stdout + res.stderr
    assert res.returncode == 0, console[-3000:]
    assert_quiet(console)
    n, p = expected_fix(items, 64, prepared)
    qa = next(ln for ln in res.stdout.splitlines() if ln.startswith("qa_train "))
    assert qa.split()[:4] == ["qa_train", "exam", "90", "27"] and "answer_truncated 63" in qa
    warning = next(ln for ln in res.stdout.splitlines() if ln.startswith("warning: qa_train:"))
    assert "63 of 90 items (70%) dropped as answer_truncated" in warning
    assert f"data.seq_len={n} covers {p}% of the items" in warning
    assert res.stdout.index(warning) < res.stdout.index("[stage1] step")  # said before training

    again = run_job("train_stages.py", "--config", str(tmp_path / "my.yaml"), "--run-dir", str(tmp_path / "run2"),
                    "--stages", "cpt,stage1", *sets(*lossy_plan.base, "data.max_reject_fraction=0.5"))
    assert again.returncode == 2
    assert again.stderr.strip() == ("error: data.max_reject_fraction: dataset 'qa_train' dropped 70.0% of its 90 "
                                    "items as answer_truncated, above the limit 0.5")
    assert "reused" in next(ln for ln in again.stdout.splitlines() if ln.startswith("qa_train "))
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()


@pytest.mark.machine
@pytest.mark.slow
def test_worker_exception_reaches_the_console_whole(tmp_path):
    """(``--verbose`` bringing Ray's own output back: test_job_submit's cpt job.)"""
    args = ["--run-dir", str(tmp_path / "run"),
            *sets(*TINY, f"data.prepared_root={tmp_path / 'prepared'}", f"train.output_dir={tmp_path}",
                  "plan.0.max_steps=3", "train.faults.raise_at_step=3", "train.max_failures=0")]
    res = run_job("cpt.py", *args)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "faults.py" in res.stderr
    assert "RuntimeError: injected fault: stage cpt step 3 (train.faults.raise_at_step)" in res.stderr
    assert "[cpt] step     2" in res.stdout
    assert_quiet(res.stdout + res.stderr)  # Ray's own worker output ("RayTrainWorker pid=…") stays in its logs


def test_prepare_command_prints_the_table_and_the_warning(tmp_path):
    items = long_answer_exam(tmp_path / "my_qa.jsonl")
    res = subprocess.run([sys.executable, "-m", "kcpt.cli", "prepare", "exam", "--input", str(tmp_path / "my_qa.jsonl"),
                          "--out", str(tmp_path / "out"), "--seq-len", "64", "--tokenizer", "demo"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(items) == 90
    out = res.stdout.splitlines()
    assert any(ln.split()[:4] == ["out", "exam", "90", "27"] and ln.endswith("prepared") for ln in out)
    assert any(ln.startswith("warning: out: 63 of 90 items (70%) dropped as answer_truncated") and
               "data.seq_len=" in ln for ln in out)


def test_kcpt_error_inside_train_v2_worker_group_error_is_found():
    from ray.train import WorkerGroupError

    from kcpt.errors import ConfigError
    from kcpt.train.launch import worker_kcpt_error

    inner = ConfigError("stage 'stage1': kl_reference 'cpt_best' but no stage of this run set a baseline")
    assert worker_kcpt_error(WorkerGroupError("rank 0 failed", {0: inner})) is inner
    assert worker_kcpt_error(WorkerGroupError("rank 0 failed", {0: RuntimeError("a bug")})) is None


def test_a_storage_error_inside_a_failed_worker_group_is_one_line_that_says_to_resume():
    """The object store gone mid-run (crash audit: moto killed during stage 1) ended the run with Ray's 40-line
    traceback; now the OSError inside the WorkerGroupError is raised as one OSError, printed as one line with the
    storage hint, saying the run keeps its last checkpoint and to --resume. A bug keeps its traceback."""
    from ray.train import WorkerGroupError

    from kcpt.errors import exit_message
    from kcpt.train.launch import raise_worker_failure

    io = OSError("When getting information for key 'runs/s3/metrics.jsonl' in bucket 'kcptb': AWS Error "
                 "NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Couldn't connect to server")
    with pytest.raises(OSError) as err:
        raise_worker_failure(WorkerGroupError("rank 0 failed", {0: io}), "s3://kcptb/runs/s3")
    line = exit_message(err.value)
    assert "\n" not in line and "NETWORK_CONNECTION" in line and "cannot reach the object store" in line
    assert "s3://kcptb/runs/s3 keeps its last complete checkpoint: once the storage works again, run the same " \
           "command with --resume" in line
    raise_worker_failure(WorkerGroupError("rank 0 failed", {0: RuntimeError("a bug")}), "runs/x")  # returns
    # the first write to fail can be Ray Train's own (its controller uploading its state): the same one line
    from ray.train import ControllerError

    with pytest.raises(OSError, match="keeps its last complete checkpoint"):
        raise_worker_failure(ControllerError(io), "s3://kcptb/runs/s3")


def test_tune_console_pickles_with_the_experiment_state():
    """Tune pickles its callbacks (experiment state, restore): a console writing to a capture buffer (pytest's,
    a notebook's) must still pickle, and a restored one writes to stdout."""
    import io
    import pickle
    import sys

    from kcpt.tune.progress import TuneConsole

    class Unpicklable(io.StringIO):
        def __reduce__(self):
            raise TypeError("cannot pickle this stream")

    restored = pickle.loads(pickle.dumps(TuneConsole(3, stream=Unpicklable(), progress=False)))
    assert restored.stream is sys.stdout and restored.total == 3
