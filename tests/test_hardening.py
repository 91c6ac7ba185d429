"""Hostile inputs: nothing destroyed, one line and exit 2 for every bad input, no traceback, no hang.

Each test breaks one rule of issue 13 (data loss, tracebacks, hangs, silent results, slow refusals). Most run
in-process; a few run the real command in a subprocess to prove "exit 2, one line on stderr, no traceback".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kcpt.cli import main as kcpt_main
from kcpt.config import ExamTemplate, load_config
from kcpt.data.exam import encode_exam_items
from kcpt.data.exam_io import read_exam_items
from kcpt.data.rejects import RejectReport
from kcpt.data.shards import read_manifest
from kcpt.data.sources import check_inputs_exist, iter_input_files, read_documents
from kcpt.data.types import ExamItem
from kcpt.errors import CheckpointError, ConfigError, InputError
from kcpt.train.rundir import MARKER, RunDir, read_metrics

ROOT = Path(__file__).resolve().parents[1]
DOC = "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. 번호 {}"


def _jsonl(path: Path, n: int = 3, extra: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": DOC.format(i)}, ensure_ascii=False) for i in range(n)] + list(extra)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``kcpt`` in-process: (exit status, stdout, stderr); a usage error's SystemExit is caught too."""
    try:
        rc = kcpt_main(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def _prepare(capsys, *args: str) -> tuple[int, str, str]:
    return run_cli(["prepare", *args, "--tokenizer", "demo", "--no-progress"], capsys)


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize(("override", "needle"), [
    ("plan.0.stop.min_delta=.nan", "plan.0.stop.min_delta: must be a finite number"),
    ("plan.0.lr.peak=.inf", "plan.0.lr.peak: must be a finite number"),
    ("plan.3.stop.exam_target=nan", "plan.3.stop.exam_target: must be a finite number"),
    ("plan.3.stop.raw_tolerance=1.5", "plan.3.stop.raw_tolerance: must be ≤ 1"),
    ("plan.3.stop.exam_target=0", "plan.3.stop.exam_target: must be > 0"),
    ("plan.3.stop.exam_metric=accuracy", "plan.3.stop.exam_target: exam_metric is accuracy, so the target is a "
                                         "fraction in (0, 1] (0.6 = 60 % right), got 3.1"),
    ("plan.3.stop.exam_metric=acc", "plan.3.stop.exam_metric: Input should be 'loss' or 'accuracy'"),
    ("train.adam_betas=[0.9, 1.0]", "train.adam_betas.1: must be in [0, 1)"),
    ("train.adam_betas=[-0.1, 0.9]", "train.adam_betas.0: must be in [0, 1)"),
    ("plan.3.mixture_schedule=[{start_frac: 0.5, weights: {raw_train: -1.0, qa_train: 2.0}}]",
     "plan.3.mixture_schedule.0.weights: must be ≥ 0"),
    ("model.trust_remote_code='yes'", "model.trust_remote_code: must be true or false"),
    ("model.trust_remote_code=1", "model.trust_remote_code: must be true or false"),
    ("train.num_workers=true", "train.num_workers: must be a number"),
    ("train.run_name=../victim", "train.run_name: '../victim' is not a safe file name"),
    ("train.run_name=''", "train.run_name: must not be empty"),
    ("plan.1.name=../../etc", "plan.1.name: '../../etc' is not a safe file name"),
    ("tune.study_name=a/b", "tune.study_name"),
    ("data.template.prompt='답: '", "prompt: must contain {question}"),
    ("data.template.prompt='{question} {answer}'", "unknown field {answer}"),
    ("data.template.prompt='{question.__class__}'", "unknown field {question.__class__}"),
    ("data.template.prompt='{question'", "write {{ and }} for literal braces"),
    ("data.template.choice='{label}'", "choice: must contain {text}"),
    ("data.template.prompt_with_choices='{question} 답: '", "must contain {choices}"),
    ("data.template.choice_labels=[]", "choice_labels"),
])
def test_config_values_that_cannot_work_are_refused(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_exam_accuracy_stop_needs_the_scorer_on_and_a_fraction_target() -> None:
    ok = load_config(None, ["plan.3.stop.exam_metric=accuracy", "plan.3.stop.exam_target=0.6"])
    assert ok.stage("stage3").stop.exam_metric == "accuracy" and ok.eval.exam_accuracy
    with pytest.raises(ConfigError, match=r"plan.3.stop.exam_metric: accuracy needs eval.exam_accuracy: true"):
        load_config(None, ["plan.3.stop.exam_metric=accuracy", "plan.3.stop.exam_target=0.6",
                           "eval.exam_accuracy=false"])
    with pytest.raises(ConfigError, match="eval.exam_accuracy_max_items"):
        load_config(None, ["eval.exam_accuracy_max_items=0"])


@pytest.mark.parametrize(("override", "needle"), [
    ("tune.stage_overrides.max_steps=0", "stage 'stage3' would have max_steps: Input should be greater than"),
    ("tune.stage_overrides.nope=1", "stage 'stage3' would have nope: unknown key"),
    ("tune.stage_overrides.lr.peak.x=1", "tune.stage_overrides.lr.peak.x: lr.peak is a value"),
    ("tune.space.extra={lr.nope: {low: 0.1, high: 0.2}}", "would have lr.nope: unknown key"),
])
def test_tune_overrides_are_checked_against_the_tuned_stage(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    load_config(None, ["tune.stage_overrides.max_steps=40", "tune.space.extra={lr.min_ratio: {low: 0.05, high: 0.3}}"])


def _no_launch(monkeypatch) -> None:
    """Make importing the Ray launchers fail, so a broken preflight fails the test instead of starting a run."""
    for mod in ("kcpt.train.launch", "kcpt.tune.launch"):
        monkeypatch.setitem(sys.modules, mod, None)


def test_tune_job_refuses_unknown_space_source_before_ray(capsys, monkeypatch) -> None:
    from kcpt.tune.commands import main

    _no_launch(monkeypatch)
    assert main(["--set", "tune.space.raw_source=nope"]) == 2
    assert "tune.space.raw_source: unknown dataset 'nope'" in capsys.readouterr().err


@pytest.mark.machine
def test_ctrl_c_in_a_ray_train_run_is_one_line_exit_130_naming_the_resume(tmp_path: Path, capsys, monkeypatch) -> None:
    """Ray Train's fit() installs its own SIGINT handler, which ends fit() with SystemExit(1): a Ctrl-C'd job used to
    exit 1 with nothing on the console (measured on `python jobs/train_stages.py` with SIGINT at its 40th step).
    The injected failure is that SystemExit; Ray, the config, the data and the run directory are real."""
    from ray.train.torch import TorchTrainer

    from kcpt.train.commands import main

    def interrupted(self):
        raise SystemExit(1)

    monkeypatch.setattr(TorchTrainer, "fit", interrupted)
    rc = main(["--stages", "cpt", "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=r",
               "--set", f"data.prepared_root={tmp_path / 'p'}", "--set", "logging.progress=false"])
    err = capsys.readouterr().err
    assert rc == 130, err
    assert err.strip() == (f"interrupted: {tmp_path / 'r'} keeps its last complete checkpoint; run the same command "
                           "with --resume to continue")


def test_a_report_piped_into_a_reader_that_went_away_ends_quietly(tmp_path: Path) -> None:
    """`kcpt report RUN | head` used to end with "error: … Broken pipe" and exit 2."""
    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    rd.write_summary({"stage_order": ["cpt"], "stages": {"cpt": {"steps": 10, "stop_reason": "max_steps"}}})
    p = subprocess.Popen([sys.executable, "-m", "kcpt.cli", "report", str(rd.root)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before kcpt writes
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


def test_a_bucket_that_does_not_exist_is_refused_before_anything_starts(s3_server, capsys) -> None:
    from kcpt.train.commands import main
    from kcpt.tune.commands import main as tune_main

    t0 = time.perf_counter()
    assert main(["--set", "train.output_dir=s3://no-such-bucket-xyz/runs"]) == 2
    assert capsys.readouterr().err.strip() == ("error: train.output_dir: s3://no-such-bucket-xyz/runs: the bucket "
                                               "'no-such-bucket-xyz' does not exist (create it, or fix the bucket in "
                                               "the URI)")
    assert time.perf_counter() - t0 < 30  # no Ray, no data preparation first (it took 9 s and named the scratch)
    assert tune_main(["--experiment-dir", "s3://no-such-bucket-xyz/exp"]) == 2
    assert "--experiment-dir: s3://no-such-bucket-xyz/exp: the bucket 'no-such-bucket-xyz' does not exist" in \
        capsys.readouterr().err
    assert main(["--set", f"data.prepared_root={s3_server}/prepared", "--set",
                 "data.datasets.raw_train.inputs=[/no/such.jsonl]"]) == 2
    assert "/no/such.jsonl" in capsys.readouterr().err  # a bucket that exists passes: the next check speaks


def test_an_unreachable_object_store_names_the_endpoint_to_check(monkeypatch) -> None:
    from kcpt import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(InputError, match=r"cannot reach the object store: check AWS_ENDPOINT_URL"):
        storage.check_bucket("s3://some-bucket/runs", "train.output_dir")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_a_plan_without_the_tuned_stage_trains_and_only_the_tune_job_refuses_it(capsys, monkeypatch) -> None:
    """``tune.stage`` (default 'stage3') used to be required of every config, so `kcpt train` refused a plan with no
    stage of that name although nothing was tuned."""
    from kcpt.train.commands import main as train_main
    from kcpt.tune.commands import main

    cfg = load_config(None, ["plan.3.name=final"])
    assert [s.name for s in cfg.plan][-1] == "final"
    _no_launch(monkeypatch)
    assert main(["--set", "plan.3.name=final"]) == 2
    assert ("tune.stage: no stage named 'stage3' in plan (['cpt', 'stage1', 'stage2', 'final']); set tune.stage to "
            "the stage to tune (--set tune.stage=NAME)") in capsys.readouterr().err
    assert main(["--set", "plan.3.name=final", "--set", "tune.stage=nope"]) == 2
    assert "no stage named 'nope'" in capsys.readouterr().err
    assert train_main(["--set", "plan.3.name=final", "--set", "data.datasets.raw_train.inputs=[/no/such.jsonl]"]) == 2
    assert "/no/such.jsonl" in capsys.readouterr().err  # past the config: refused for its input, not for tune.stage


def test_tune_job_never_writes_into_a_users_experiment_dir(tmp_path: Path, capsys, monkeypatch) -> None:
    from kcpt.tune.commands import main

    _no_launch(monkeypatch)
    (tmp_path / "config.yaml").write_text("mine")
    assert main(["--experiment-dir", str(tmp_path)]) == 2
    assert "is not a kcpt tune experiment" in capsys.readouterr().err
    assert (tmp_path / "config.yaml").read_text() == "mine"


def test_audit_tokenizer_never_writes_into_a_users_dir(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    rc, _, err = run_cli(["audit-tokenizer", "--expand", "2", "--out", str(tmp_path)], capsys)
    assert_one_line_error(rc, err, "is not a tokenizer directory")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_unsafe_dataset_name_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  datasets:\n    ../up: {kind: raw, inputs: [x]}\nplan: []\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"data\.datasets\.\.\./up: '\.\./up' is not a safe file name"):
        load_config(cfg)


def test_template_literal_braces_and_plain_templates_still_work() -> None:
    t = ExamTemplate(prompt="{{문제}} {question}\n답: ")
    assert t.prompt.format(question="q") == "{문제} q\n답: "
    load_config(None, ["data.template.choice='{text}'", "train.run_name=실험-1.a_b"])


@pytest.mark.parametrize(("override", "needle"), [
    ("plan.0.name.x.y=1", "plan.0.name is a value (str), not a mapping or list"),
    ("plan.x.name=a", "plan.x: a list index must be a non-negative integer"),
    ("plan.-1.name=a", "plan.-1: a list index must be a non-negative integer"),
    ("plan.9.name=a", "plan.9: index 9 out of range (the list has 4 items)"),
    ("train..seed=1", "empty key"),
    ("=1", "empty key"),
    ("train.seed=[1", "not valid YAML: line 1"),
    ("train.seed=!!python/object/apply:os.system [ls]", "not valid YAML"),
    ("train.seed={a: 1, a: 2}", "appears twice"),
    ("train.seed", "expected key.path=value"),
])
def test_set_overrides_that_cannot_apply_name_the_key_path(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value) and f"override '{override}'" in str(e.value)


def test_yaml_file_problems_are_config_errors(tmp_path: Path) -> None:
    cases = {
        "dup.yaml": (b"train:\n  seed: 1\nlogging:\n  progress: false\ntrain:\n  num_workers: 1\n",
                     "key 'train' appears twice in one mapping (first at line 1)"),
        "bytes.yaml": (b"train:\n  seed: 1\n  run_name: \xffbad\n", "line 3: not UTF-8"),
        "bomb.yaml": (b"a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                      b"c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
                      b"e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n",
                      "more than 200000 values"),
        "deep.yaml": (b"a: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested too deeply"),
        "tag.yaml": (b"train: !!python/object/apply:os.system [ls]\n", "not valid YAML"),
        "list.yaml": (b"- 1\n- 2\n", "the top level must be a mapping"),
    }
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError) as e:
            load_config(tmp_path / name)
        assert needle in str(e.value) and str(tmp_path / name) in str(e.value), (name, str(e.value))


def test_config_that_is_a_fifo_or_a_directory_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    for p in (fifo, tmp_path):
        with pytest.raises(ConfigError, match="not a regular file"):
            load_config(p)


# --------------------------------------------------------------------------- data inputs


def test_huge_integers_and_deep_nesting_are_counted_bad_json(tmp_path: Path) -> None:
    p = _jsonl(tmp_path / "a.jsonl", 2, ['{"text": ' + "1" * 5000 + "}", "[" * 100_000 + "]" * 100_000,
                                         '{"text": {"a": ' + "[" * 50_000 + "]" * 50_000 + "}}"])
    rep = RejectReport()
    docs = list(read_documents([p], report=rep))
    assert len(docs) == 2 and rep.counts == {"bad_json": 3}
    assert any("4300 digits" in m for m in rep.to_dict()["examples"]["bad_json"])
    assert any("nested too deeply" in m for m in rep.to_dict()["examples"]["bad_json"])
    with pytest.raises(InputError, match=r"a\.jsonl: line 3: not valid JSON"):
        list(read_documents([p], report=RejectReport(), strict=True))
    exam = tmp_path / "e.jsonl"
    exam.write_text('{"id": ' + "9" * 5000 + "}\n", encoding="utf-8")
    rep = RejectReport()
    assert list(read_exam_items([exam], report=rep)) == [] and rep.counts == {"bad_json": 1}


def test_symlink_loops_are_noticed_and_every_file_read_once(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    _jsonl(corpus / "a.jsonl", 3)
    (corpus / "self").symlink_to(".")
    (corpus / "sub").mkdir()
    (corpus / "sub" / "up").symlink_to("..")
    (corpus / "sub" / "again").symlink_to("../sub")
    rep = RejectReport()
    t0 = time.monotonic()
    files = iter_input_files([corpus, corpus / "a.jsonl"], report=rep)
    assert time.monotonic() - t0 < 5
    assert files == [corpus / "a.jsonl"]
    assert rep.notices["symlink_loop"] == 3 and rep.notices["duplicate_input"] == 1
    docs = list(read_documents([corpus, corpus / "a.jsonl", corpus / "self" / "a.jsonl"], report=RejectReport()))
    assert len(docs) == 3


def test_a_second_link_to_a_directory_is_read_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _jsonl(data / "x.jsonl", 2)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "l1").symlink_to(data)
    (corpus / "l2").symlink_to(data)
    rep = RejectReport()
    assert iter_input_files([corpus], report=rep) == [corpus / "l1" / "x.jsonl"]
    assert rep.notices == {"duplicate_input": 1}


def test_special_files_and_broken_links_in_a_walk_are_skipped_with_a_notice(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    _jsonl(corpus / "a.jsonl", 1)
    os.mkfifo(corpus / "pipe.jsonl")
    (corpus / "dangling.jsonl").symlink_to("nowhere.jsonl")
    (corpus / "loop.txt").symlink_to("loop.txt")
    rep = RejectReport()
    docs = list(read_documents([corpus], report=rep))  # would block forever if the FIFO were opened
    assert len(docs) == 1
    assert rep.notices == {"bad_symlink": 2, "special_file": 1}
    msgs = " ".join(rep.to_dict()["examples"]["bad_symlink"])
    assert "dangling symbolic link" in msgs and "symbolic link loop" in msgs


def test_hidden_files_and_directories_in_a_walk_are_noticed_not_read(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    _jsonl(corpus / "a.jsonl", 1)
    _jsonl(corpus / ".draft.jsonl", 2)
    _jsonl(corpus / ".ipynb_checkpoints" / "b.jsonl", 3)
    rep = RejectReport()
    assert len(list(read_documents([corpus], report=rep))) == 1
    assert rep.notices == {"skipped_file": 2}
    assert all("hidden" in m for m in rep.to_dict()["examples"]["skipped_file"])
    assert len(list(read_documents([corpus / ".draft.jsonl"], report=RejectReport()))) == 2  # named: read


@pytest.mark.parametrize(("make", "needle"), [
    (lambda p: os.mkfifo(p), "not a regular file or a directory"),
    (lambda p: p.symlink_to(p.name), "symbolic link loop"),
    (lambda p: p.symlink_to("gone.jsonl"), "dangling symbolic link"),
    (lambda p: None, "input path does not exist"),
])
def test_explicit_bad_inputs_are_input_errors(tmp_path: Path, make, needle: str) -> None:
    p = tmp_path / "in.jsonl"
    make(p)
    with pytest.raises(InputError, match=needle):
        iter_input_files([p])
    with pytest.raises(InputError, match=needle):
        check_inputs_exist([str(p)], where="data.datasets.x.inputs")


def test_unreadable_file_is_an_input_error_naming_it(tmp_path: Path, monkeypatch) -> None:
    p = _jsonl(tmp_path / "a.jsonl", 1)
    real_open = open

    def deny(file, *a, **k):
        if str(file) == str(p):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(InputError, match=r"a\.jsonl: cannot read: Permission denied"):
        list(read_documents([p], report=RejectReport()))
    with pytest.raises(InputError, match=r"a\.jsonl: cannot read: Permission denied"):
        list(read_exam_items([p], report=RejectReport()))


def test_more_choices_than_labels_is_a_counted_skip(tmp_path: Path) -> None:
    from kcpt.model.tokenizer import load_tokenizer

    tok = load_tokenizer(load_config().tokenizer)
    template = ExamTemplate(choice_labels=["A", "B"])
    items = [ExamItem(id="1", answer="x", kind="example", question="q", choices=["a", "b", "c"], source="f",
                      line=1), ExamItem(id="2", answer="y", kind="qa", question="q", source="f", line=2)]
    rep = RejectReport()
    assert len(list(encode_exam_items(items, tok, template, 64, report=rep))) == 1
    assert rep.counts == {"too_many_choices": 1}
    assert "f: line 1: field 'choices'" in rep.to_dict()["examples"]["too_many_choices"][0]
    with pytest.raises(InputError, match="too_many_choices"):
        list(encode_exam_items(items, tok, template, 64, report=RejectReport(), strict=True))


def test_damaged_tokenizer_is_a_config_error(tmp_path: Path, capsys) -> None:
    """Found by probing: a tokenizer.json without 'added_tokens' raised a KeyError traceback."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"x": 1}')
    (tok / "tokenizer_config.json").write_text("{}")
    a = _jsonl(tmp_path / "a.jsonl", 1)
    rc, _, err = run_cli(["prepare", "raw", "--input", str(a), "--out", str(tmp_path / "o"), "--tokenizer", str(tok),
                          "--no-progress"], capsys)
    assert_one_line_error(rc, err, "tokenizer.path: cannot load tokenizer")


def test_job_refuses_a_missing_local_model_dir_before_ray(capsys, monkeypatch) -> None:
    from kcpt.train.commands import main

    _no_launch(monkeypatch)
    assert main(["--set", "model.name_or_path=./no/such/model"]) == 2
    assert "model.name_or_path: './no/such/model' is not a directory" in capsys.readouterr().err
    assert main(["--set", "train.deepspeed={zero_stage: 2, config: /no/such/ds.json}"]) == 2
    assert "train.deepspeed.config: /no/such/ds.json: no such file" in capsys.readouterr().err


def test_a_kl_reference_is_given_on_the_command_line_or_the_stage_is_refused_before_ray(tmp_path: Path, capsys,
                                                                                       monkeypatch) -> None:
    """Stage 1 alone (KL to ``cpt_best``, no CPT stage in the run): refused in one line naming the flag that gives
    the reference; a reference that is not a directory is refused before Ray; with one, the refusal is gone (the run
    gets as far as reading the checkpoint: an empty directory is not one)."""
    from kcpt.train.commands import main

    base = ["--stages", "stage1", "--baseline-raw-best", "7.0", "--set", f"train.output_dir={tmp_path / 'runs'}",
            "--set", f"data.prepared_root={tmp_path / 'prep'}", "--set", "data.seq_len=64"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "plan stage 'stage1': kl_beta 0.1 with kl_reference cpt_best, but no stage before it" in err
    assert "--reference-checkpoint CKPT" in err and not (tmp_path / "runs").exists()
    assert main([*base, "--reference-checkpoint", str(tmp_path / "nope")]) == 2
    assert f"--reference-checkpoint {tmp_path / 'nope'}: no such checkpoint directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*base, "--reference-checkpoint", str(tmp_path / "empty"), "--set", "logging.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "kl_reference cpt_best" not in err
    assert f"reference_checkpoint: incomplete checkpoint {tmp_path / 'empty'}" in err


def test_run_with_a_bad_deepspeed_json_deletes_nothing(tmp_path: Path) -> None:
    from kcpt.train.launch import run_plan

    ds = tmp_path / "ds.json"
    ds.write_text('{"gradient_clipping": 5.0}')
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.run_name=r",
                             f"train.deepspeed={{zero_stage: 2, config: {ds}}}"])
    rd = RunDir(tmp_path / "r").create(cfg)
    (rd.checkpoints / "0-cpt-step10").mkdir()
    with pytest.raises(ConfigError, match="gradient_clipping"):
        run_plan(cfg, stages=["cpt"], resume="overwrite")
    assert (rd.checkpoints / "0-cpt-step10").is_dir()


# --------------------------------------------------------------------------- kcpt prepare: outputs


def test_same_file_twice_is_kept_once_in_the_manifest(tmp_path: Path, capsys) -> None:
    a = _jsonl(tmp_path / "c" / "a.jsonl", 3)
    rc, out, err = _prepare(capsys, "raw", "--input", str(a), str(a), str(tmp_path / "c"), "--out",
                            str(tmp_path / "out"))
    assert rc == 0, err
    m = read_manifest(tmp_path / "out")
    assert sum(i["documents"] for i in m["inputs"]) == 3 and m["rejects"] == {}
    assert m["notices"]["duplicate_input"] == 2
    assert "kept 3 documents" in out


def test_items_of_another_kind_are_counted_as_a_notice(tmp_path: Path) -> None:
    p = tmp_path / "e.jsonl"
    p.write_text("\n".join(json.dumps({"id": str(i), "question": "질문", "answer": "답", "kind": k}, ensure_ascii=False)
                           for i, k in enumerate(["qa", "example", "qa"])) + "\n", encoding="utf-8")
    rep = RejectReport()
    assert [i.id for i in read_exam_items([p], report=rep, kind="qa")] == ["0", "2"]
    assert rep.notices == {"other_kind": 1} and rep.counts == {}


def test_datasetdict_input_documents_are_credited(tmp_path: Path, capsys) -> None:
    """Found while fixing the double count: documents of a DatasetDict's splits ('dir[train]') were credited to
    no input in the manifest."""
    import datasets

    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": [DOC.format(f"{s}{i}") for i in range(n)]})
                               for s, n in (("train", 3), ("test", 2))})
    dd.save_to_disk(str(tmp_path / "hf"))
    rc, _, err = _prepare(capsys, "raw", "--input", str(tmp_path / "hf"), "--out", str(tmp_path / "out"))
    assert rc == 0, err
    assert [i["documents"] for i in read_manifest(tmp_path / "out")["inputs"]] == [5]


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_overwrite_never_destroys_an_input(tmp_path: Path, capsys, where: str) -> None:
    corpus = tmp_path / "corpus"
    a = _jsonl(corpus / "a.jsonl", 3)
    out = {"same": corpus, "parent": tmp_path, "inside": corpus / "out"}[where]
    rc, _, err = _prepare(capsys, "raw", "--input", str(corpus), "--out", str(out), "--overwrite")
    assert_one_line_error(rc, err, str(out), "choose")
    assert a.read_text(encoding="utf-8").count("\n") == 3


def test_overwrite_never_replaces_a_prepared_dataset_holding_an_input(tmp_path: Path, capsys) -> None:
    a = _jsonl(tmp_path / "a.jsonl", 3)
    out = tmp_path / "out"
    assert _prepare(capsys, "raw", "--input", str(a), "--out", str(out))[0] == 0
    inside = _jsonl(out / "more.jsonl", 2)  # the user keeps an input inside a prepared dataset
    rc, _, err = _prepare(capsys, "raw", "--input", str(inside), "--out", str(out), "--overwrite")
    assert_one_line_error(rc, err, "is or holds the input")
    assert inside.is_file()


def test_overwrite_replaces_only_a_prepared_dataset(tmp_path: Path, capsys) -> None:
    a = _jsonl(tmp_path / "a.jsonl", 3)
    mine = tmp_path / "mine"
    (mine / "notes.txt").parent.mkdir()
    (mine / "notes.txt").write_text("precious")
    rc, _, err = _prepare(capsys, "raw", "--input", str(a), "--out", str(mine), "--overwrite")
    assert_one_line_error(rc, err, "is not a prepared dataset")
    assert (mine / "notes.txt").read_text() == "precious"
    out = tmp_path / "out"
    assert _prepare(capsys, "raw", "--input", str(a), "--out", str(out))[0] == 0
    first = read_manifest(out)["created"]
    assert _prepare(capsys, "raw", "--input", str(a), "--out", str(out), "--overwrite")[0] == 0
    assert read_manifest(out)["created"] >= first and (out / "manifest.json").is_file()


def test_stale_temp_dirs_of_a_killed_prepare_are_removed(tmp_path: Path, capsys) -> None:
    a = _jsonl(tmp_path / "a.jsonl", 2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".out.tmp-{host}-{dead.pid}-abcd1234"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-efgh5678"
    other = tmp_path / f".out.tmp-otherhost-{dead.pid}-ijkl9012"
    for d in (stale, live, other):
        d.mkdir()
    assert _prepare(capsys, "raw", "--input", str(a), "--out", str(tmp_path / "out"))[0] == 0
    assert not stale.exists() and live.exists() and other.exists()


def test_stale_siblings_of_demo_and_tokenizer_caches_are_removed(tmp_path: Path, monkeypatch) -> None:
    from kcpt.data.demo import build_demo_corpus
    from kcpt.fsutil import remove_stale_siblings

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    target = tmp_path / "demo"
    stale = [tmp_path / f".demo.{k}-{host}-{dead.pid}-x1y2z3w4" for k in ("tmp", "old")]
    keep = [tmp_path / f".demo.tmp-{host}-{os.getpid()}-a1b2c3d4", tmp_path / ".demo.tmp-nohyphens"]
    for d in stale + keep:
        d.mkdir()
    assert sorted(remove_stale_siblings(target)) == sorted(stale)
    assert all(d.exists() for d in keep)
    (stale[0]).mkdir()
    build_demo_corpus(target)  # the demo build cleans up before it builds
    assert not stale[0].exists() and (target / "raw_train.jsonl").is_file()


def test_unwritable_output_is_one_line(tmp_path: Path, capsys) -> None:
    a = _jsonl(tmp_path / "a.jsonl", 2)
    rc, _, err = _prepare(capsys, "raw", "--input", str(a), "--out", str(a / "sub" / "out"))
    assert_one_line_error(rc, err, "cannot create the output directory")


def test_unwritable_output_os_error_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    a = _jsonl(tmp_path / "a.jsonl", 2)

    def full(*_a, **_k):
        raise OSError(28, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr("kcpt.data.shards.write_shards", full)
    rc, _, err = _prepare(capsys, "raw", "--input", str(a), "--out", str(tmp_path / "out"))
    assert_one_line_error(rc, err, "cannot write the output: No space left on device")
    assert not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())


def test_any_os_error_reaching_the_cli_is_one_line(capsys, monkeypatch) -> None:
    def boom(args):
        raise PermissionError(13, "Permission denied", "/somewhere/x")

    monkeypatch.setattr("kcpt.analysis.commands._report", boom)
    monkeypatch.setattr("kcpt.data.commands.run_prepare", boom)
    rc, _, err = run_cli(["prepare", "raw", "--input", "x", "--out", "y"], capsys)
    assert_one_line_error(rc, err, "/somewhere/x: Permission denied")


# --------------------------------------------------------------------------- run directories


def test_run_dir_not_made_by_kcpt_is_never_written_or_cleaned(tmp_path: Path) -> None:
    user = tmp_path / "mine"
    (user / "checkpoints").mkdir(parents=True)
    (user / "config.yaml").write_text("precious")
    rd = RunDir(user)
    with pytest.raises(InputError, match="kcpt did not create it"):
        rd.check_owned()
    with pytest.raises(InputError):
        rd.start_over()
    with pytest.raises(InputError):
        rd.create(load_config())
    assert (user / "config.yaml").read_text() == "precious" and (user / "checkpoints").is_dir()


def test_start_over_removes_only_kcpt_entries_and_never_an_input(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run").create(load_config())
    assert (rd.root / MARKER).is_file()
    (rd.checkpoints / "0-cpt-step10").mkdir()
    rd.append_metrics({"step": 1})
    (rd.root / "notes.txt").write_text("mine")
    inp = rd.checkpoints / "data.jsonl"
    inp.write_text("{}")
    with pytest.raises(InputError, match="starting the run over would delete"):
        rd.start_over([inp])
    assert inp.exists()
    inp.unlink()
    rd.start_over([tmp_path / "elsewhere.jsonl"])
    assert not rd.checkpoints.exists() and not rd.metrics_path.exists()
    assert (rd.root / "notes.txt").read_text() == "mine" and (rd.root / MARKER).is_file()


@pytest.mark.machine
def test_run_with_a_typo_in_a_data_path_deletes_nothing(tmp_path: Path) -> None:
    from kcpt.train.launch import run_plan

    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.run_name=r",
                             f"data.prepared_root={tmp_path / 'p'}"])
    cfg.data.datasets["raw_val"].inputs = [str(tmp_path / "typo.jsonl")]
    rd = RunDir(tmp_path / "r").create(cfg)
    (rd.checkpoints / "0-cpt-step10").mkdir()
    rd.append_metrics({"stage": "cpt", "step": 10})
    with pytest.raises(InputError, match="does not exist"):
        run_plan(cfg, stages=["cpt"], resume="overwrite")
    assert (rd.checkpoints / "0-cpt-step10").is_dir() and read_metrics(rd.root) == [{"stage": "cpt", "step": 10}]


def test_a_dataset_with_no_rows_is_refused_on_the_driver_naming_it_and_what_was_dropped(tmp_path: Path,
                                                                                       capsys) -> None:
    """A held-out set whose every document is dropped used to fail in each worker ("prepared dataset has no rows",
    no dataset named) after Ray Train had retried it twice; now the driver refuses it before anything trains or is
    deleted, with the dataset, its input, the reasons and the fix."""
    from kcpt.train.launch import run_plan

    empty = tmp_path / "val.jsonl"
    empty.write_text('{"text": "   "}\n{"text": ""}\n', encoding="utf-8")
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.run_name=r",
                             f"data.prepared_root={tmp_path / 'p'}"])
    cfg.data.datasets["raw_val"].inputs = [str(empty)]
    rd = RunDir(tmp_path / "r").create(cfg)
    (rd.checkpoints / "0-cpt-step10").mkdir()
    with pytest.raises(InputError) as e:
        run_plan(cfg, stages=["cpt"], resume="overwrite", in_process=True)
    msg = str(e.value)
    assert msg.startswith("dataset 'raw_val' has no rows: 0 of 2 documents kept (dropped: empty 2) from "
                          f"{empty}. Fix:"), msg
    assert (rd.checkpoints / "0-cpt-step10").is_dir() and not rd.metrics_path.exists()
    out = capsys.readouterr().out  # the data table came first, with the demo/own mix warned
    assert "warning: raw_train reads the embedded demo data while raw_val reads other inputs" in out


def test_an_exam_kind_that_matches_nothing_and_too_few_rows_for_the_workers_are_refused() -> None:
    from kcpt.train.plan import check_rows

    cfg = load_config(None, ["data.datasets.exam_val.exam_kind=qa"])
    ok = {"rows": 4, "inputs": [{"documents": 9}]}
    manifests = {n: ok for n in cfg.data.datasets}
    check_rows(cfg, ["cpt", "stage1"], manifests, world=2)
    with pytest.raises(InputError, match=r"dataset 'exam_val' has no rows: 0 of 0 items kept; 7 items of another "
                                         r"kind skipped \(data.datasets.exam_val.exam_kind: 'qa'\)"):
        check_rows(cfg, ["cpt", "stage1"], {**manifests, "exam_val": {"rows": 0, "notices": {"other_kind": 7}}}, 2)
    few = {**manifests, "qa_train": {"rows": 1, "inputs": [{"documents": 2}], "rejects": {"duplicate_id": 1}}}
    with pytest.raises(InputError, match=r"dataset 'qa_train' has 1 rows, fewer than the 2 workers .*2 of 3 items kept "
                                         r"\(dropped: duplicate_id 1\).*train.num_workers=1"):
        check_rows(cfg, ["cpt", "stage1"], few, world=2)
    check_rows(cfg, ["cpt", "stage1"], few, world=1)
    check_rows(cfg, ["cpt", "stage1"], {**manifests, "exam_val": {"rows": 1}}, world=2)  # an eval set: 1 row is enough


def test_torn_and_damaged_metrics_lines(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.metrics_path.write_text('{"step": 1}\n{"step": 2, "los', encoding="utf-8")
    assert read_metrics(tmp_path) == [{"step": 1}]
    rd.append_metrics({"step": 3})
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 3}]
    rd.metrics_path.write_text('{"step": 1}\nnot json\n{"step": 2}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"metrics\.jsonl: line 2: not valid JSON"):
        read_metrics(tmp_path)


def test_report_on_damaged_run_files_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "summary.json").write_text("{broken", encoding="utf-8")
    rc, _, err = run_cli(["report", str(tmp_path)], capsys)
    assert_one_line_error(rc, err, "summary.json: not valid JSON")
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "trials.parquet").write_bytes(b"PAR1 not really")
    (exp / "experiment.json").write_text("{}", encoding="utf-8")
    rc, _, err = run_cli(["report", str(exp)], capsys)
    assert_one_line_error(rc, err, "trials.parquet: cannot read as Parquet")


@pytest.mark.parametrize(("metrics", "summary", "needle"), [
    ('{"stage": "cpt"}', '{"stages": {}}', "record 1: key 'step' is missing"),
    ('{"stage": "cpt", "step": 1, "checkpoint": 5}', '{"stages": {}}', "key 'checkpoint' has a int"),
    ('{"stage": "cpt", "step": 1, "raw_val_loss": "a"}', '{"stages": {}}', "key 'raw_val_loss' has a str"),
    ("", '{"stages": {"cpt": 5}}', "stage 'cpt': not an object"),
    ("", '{"stages": {}, "stage_order": "cpt"}', "'stage_order' must be a list"),
    ("", '{"stages": {"cpt": {"best_raw_val_loss": "x"}}}', "key 'best_raw_val_loss' has a str"),
])
def test_report_on_wrongly_typed_run_files_is_one_line(tmp_path: Path, capsys, metrics, summary, needle) -> None:
    (tmp_path / "metrics.jsonl").write_text(metrics + "\n", encoding="utf-8")
    (tmp_path / "summary.json").write_text(summary, encoding="utf-8")
    rc, _, err = run_cli(["report", str(tmp_path)], capsys)
    assert_one_line_error(rc, err, needle)


def test_bom_does_not_split_an_over_long_first_line(tmp_path: Path) -> None:
    """Found by the property tests: the BOM was stripped before the length check, so an over-long first line
    was read as two records (two line_too_long rejects for one line)."""
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"text": ' + b"1" * 2000 + b"}")
    rep = RejectReport()
    assert list(read_documents([p], report=rep, max_line_chars=300)) == []
    assert rep.counts == {"line_too_long": 1}


# --------------------------------------------------------------------------- checkpoints


def _fake_checkpoint(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    manifest = {"complete": True, "files": {n: len(d) for n, d in files.items()}, "step": 1, "stage_index": 0}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_corrupt_trainer_state_is_a_checkpoint_error(tmp_path: Path) -> None:
    from kcpt.train.checkpoint import load_trainer_state

    for i, data in enumerate([b"garbage" * 10, b"\x80\x02}q\x00.", b""]):
        ckpt = _fake_checkpoint(tmp_path / f"c{i}", {"trainer_state.pt": data})
        with pytest.raises(CheckpointError) as e:
            load_trainer_state(ckpt)
        assert "cannot load the trainer state" in str(e.value) and "weights_only=False" not in str(e.value)


def test_corrupt_weights_and_manifests_are_checkpoint_errors(tmp_path: Path) -> None:
    from kcpt.train.checkpoint import read_manifest, verify_weights

    ckpt = _fake_checkpoint(tmp_path / "w", {"model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json",
                                             "config.json": b"{}"})
    with pytest.raises(CheckpointError, match="cannot open the weights"):
        verify_weights(ckpt)
    bad = tmp_path / "m"
    bad.mkdir()
    for manifest in ({"complete": True, "files": ["a"]}, {"complete": True, "files": {"../x": 1}},
                     {"complete": True, "step": "ten"}, [1, 2]):
        (bad / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError):
            read_manifest(bad)


# --------------------------------------------------------------------------- the real commands


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=120, env=env)


def test_subprocess_bad_inputs_exit_2_with_one_line(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_bytes(b"train:\n  seed: \xfe\n")
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": ' + "7" * 5000 + "}\n", encoding="utf-8")
    cases = [
        ([str(ROOT / "jobs" / "train_stages.py"), "--config", str(bad_yaml)], "line 2: not UTF-8"),
        ([str(ROOT / "jobs" / "cpt.py"), "--set", "plan.0.name.x.y=1"], "plan.0.name is a value"),
        ([str(ROOT / "jobs" / "tune_stage3.py"), "--set", "train.run_name=../victim"], "not a safe file name"),
        (["-m", "kcpt.cli", "prepare", "raw", "--input", str(big), "--out", str(tmp_path / "o"), "--strict",
          "--tokenizer", "demo", "--no-progress"], "line 1: not valid JSON"),
        (["-m", "kcpt.cli", "prepare", "raw", "--bogus"], "the following arguments are required"),
    ]
    for args, needle in cases:
        res = _run(args, tmp_path)
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], (args, res.stderr)


def test_jobs_refuse_a_typo_before_importing_ray_or_torch(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  datasets:\n    raw_train: {{kind: raw, inputs: [{tmp_path / 'nope'}]}}\n"
                   "    raw_val: {kind: raw, inputs: ['demo:raw_val']}\n"
                   "plan:\n  - {name: cpt, sources: {raw_train: 1.0}, sets_baseline: true}\n"
                   "tune: {stage: cpt}\n", encoding="utf-8")
    probe = ("import sys, time; t = time.perf_counter()\n"
             "from kcpt.{mod}.commands import main\n"
             "rc = main({argv})\n"
             "print(rc, 'torch' in sys.modules, 'ray' in sys.modules, round(time.perf_counter() - t, 3))\n")
    for mod, argv in (("train", ["--config", str(cfg)]), ("tune", ["--config", str(cfg)]),
                      ("train", ["--set", "train.num_workrs=3"]),
                      ("data", ["prepare", "raw", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]),
                      ("data", ["prepare", "raw", "--input", str(tmp_path), "--out", str(tmp_path), "--overwrite"])):
        code = probe.replace("{mod}", mod).replace("{argv}", repr(argv))
        if mod == "data":
            code = code.replace("from kcpt.data.commands import main", "from kcpt.cli import main")
        res = _run(["-c", code], tmp_path)
        rc, torch_loaded, ray_loaded, secs = res.stdout.split()
        assert (rc, torch_loaded, ray_loaded) == ("2", "False", "False"), res.stdout + res.stderr
        assert float(secs) < 2.0
        assert "error:" in res.stderr and "Traceback" not in res.stderr
