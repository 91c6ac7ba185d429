"""The stage loop on real Ray Train (2 workers, DDP over gloo, tiny Llama with attention dropout, the demo data
at seq_len 64).

One Ray for the module. Covers: injected NaN + grad spike roll back and the run finishes (bf16 autocast), and an
elastic world with a spare worker reading Ray Data runs it exactly as one worker does; a
worker killed mid-stage with a checkpoint write in flight is replaced and the run ends with the same metrics as an
uninterrupted one (dropout: every rank's RNG is restored; the Ray Data loader); a deterministic abort ends the run
once (not retried by FailureConfig); ``run_plan(in_task=True)`` at world size 1 (one Ray task, retried after a
kill from its latest checkpoint, a KcptError back as itself); a full resume refuses a changed tokenizer / data hash;
DeepSpeed ZeRO-2 (optimizer offloaded) and ZeRO-3 at parity with DDP (NaN + spike roll back, LR cut,
kill-and-resume exact, full optimizer state across stages); the run report.
The demo plan end to end (local, and on 2 nodes + S3) is in test_cluster_s3.py.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "kcpt" / "torch_extensions"))

ray = pytest.importorskip("ray")

from kcpt.analysis.run_report import format_run_report  # noqa: E402
from kcpt.config import load_config  # noqa: E402
from kcpt.errors import CheckpointError, TrainingAborted  # noqa: E402
from kcpt.train.checkpoint import list_checkpoints, load_trainer_state, read_manifest  # noqa: E402
from kcpt.train.launch import run_plan  # noqa: E402
from kcpt.train.rundir import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow

COMPARED = ("raw_val_loss", "exam_val_loss", "train_loss", "kl", "grad_norm", "lr", "tokens_seen", "gate_streak",
            "train_loss_qa_train", "train_loss_raw_train")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepared")


def small_cfg(prepared_root: Path, out: Path, name: str, *extra: str):
    """Tiny model, seq_len 64, 2 workers; plan: cpt (8 steps) → stage3 (qa + raw mixture, KL, 6 steps)."""
    base = [
        "data.seq_len=64", f"data.prepared_root={prepared_root}", "logging.progress=false",
        "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64",
        "train.micro_batch_size=4", "train.eval_batch_size=16", "train.max_eval_rows=32", "train.num_workers=2",
        f"train.output_dir={out}", f"train.run_name={name}", "model.tiny.attention_dropout=0.1",
        "train.anomaly.min_history=3", "train.anomaly.stable_every=2",
        "plan=[]",
    ]
    plan = ('[{name: cpt, sources: {raw_train: 1.0}, max_steps: 8, eval_every: 4, sets_baseline: true, '
            'lr: {peak: 0.003, warmup_steps: 2}, stop: {rule: max_steps}}, '
            '{name: stage3, sources: {qa_train: 0.6, raw_train: 0.4}, max_steps: 6, eval_every: 3, '
            'eval_exam: qa_val, kl_beta: 0.1, lr: {peak: 0.002, warmup_steps: 1}, restore: full, '
            'stop: {rule: gate, exam_target: 100.0, raw_tolerance: 0.5, consecutive: 5}}]')
    ov = [*base[:-1], f"plan={plan}", "tune.stage=stage3", *extra]
    return load_config(None, ov)


def _by_key(records):
    return {(r["stage"], r["step"]): r for r in records}


FAULTS_ONE_WORKER = ("train.faults.nan_at_step=3", "train.faults.grad_spike_at_step=7", "model.dtype=bfloat16",
                     "data.loader=ray_data", "train.num_workers=1", "train.grad_accum=3")
"""An injected NaN and a gradient spike in CPT under bf16 autocast, one worker reading Ray Data, 3 micro-batches per
step."""


@pytest.fixture(scope="module")
def faults_one_worker(ray_session, prepared_root, tmp_path_factory):
    return run_plan(small_cfg(prepared_root, tmp_path_factory.mktemp("faults"), "faults", *FAULTS_ONE_WORKER),
                    stages=["cpt"], resume="never")


def test_nan_and_grad_spike_roll_back_and_finish_under_bf16_autocast(faults_one_worker):
    """model.dtype bfloat16 without DeepSpeed: forwards autocast to bf16, weights (and checkpoints) stay fp32; an
    injected NaN and a gradient spike each roll back, and the run finishes."""
    res = faults_one_worker
    s = res.summaries["cpt"]
    assert s["steps"] == 8 and s["rollbacks"] == 2
    recs = [r for r in read_metrics(res.run_dir) if r["stage"] == "cpt"]
    assert [r["rollbacks"] for r in recs] == [0, 1, 2]  # evals at steps 0, 4, 8: NaN at 3, spike at 7
    assert all(math.isfinite(r["raw_val_loss"]) for r in recs)
    assert recs[-1]["raw_val_loss"] < recs[0]["raw_val_loss"]
    from safetensors.torch import load_file

    weights = load_file(str(Path(res.best_checkpoints["cpt"]) / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {__import__("torch").float32}


# a spare rank's unread split would block the reader for good: the thread method ends the session with every
# thread's stack (the signal method does not end a hang inside fit); test_ray_stream.py tests the split itself
@pytest.mark.timeout(300, method="thread")
def test_an_elastic_world_with_a_spare_worker_reads_ray_data_as_the_one_worker_run(faults_one_worker, prepared_root,
                                                                                    tmp_path, capsys):
    """``data.loader: ray_data`` on an elastic world whose workers do not divide the step: ``num_workers`` 3 at
    1.2 CPUs each on this 3-CPU Ray starts 2 workers; the step's 3 micro-batches go to 1 reading worker, the other
    runs padding micro-batches and gets no Ray Data split (:mod:`kcpt.train.ray_data_config`). Every CPT eval equals
    the 1-worker run's with ``grad_accum`` 3 (the same rows, read from the same one-way split; the NaN and the spike
    roll back the same, on both ranks)."""
    capsys.readouterr()
    got = run_plan(small_cfg(prepared_root, tmp_path, "elastic", *FAULTS_ONE_WORKER, "train.num_workers=3",
                             "train.grad_accum=1", "train.min_workers=1", "train.cpus_per_worker=1.2"),
                   stages=["cpt"], resume="never")
    assert ("elastic: 2 of 3 workers; each step's 3 micro-batches as 1 reading worker × 3, 1 worker running padding "
            "micro-batches (weightless: 3 do not divide over 2)") in capsys.readouterr().out
    recs = read_metrics(got.run_dir)
    assert [(r["step"], r["workers"]) for r in recs] == [(0, 2), (4, 2), (8, 2)]
    _assert_same_metrics(got.run_dir, faults_one_worker.run_dir)
    assert [r["epoch"] for r in recs] == [r["epoch"] for r in read_metrics(faults_one_worker.run_dir)]  # 1 reader's


@pytest.fixture(scope="module")
def uninterrupted(ray_session, prepared_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = small_cfg(prepared_root, out, "straight", *RAY_DATA)
    return run_plan(cfg, resume="never")


RAY_DATA = ("data.loader=ray_data", "plan.1.max_steps=9")
"""The module's uninterrupted run reads its sources through TorchTrainer(datasets=…) + get_dataset_shard (the
DeepSpeed and fault tests use the default loader); its stage 3 evaluates at steps 3, 6 and 9."""


def test_worker_killed_with_a_write_in_flight_resumes_exactly_with_the_ray_data_loader(uninterrupted, prepared_root,
                                                                                          tmp_path):
    """Rank 1 dies at the start of stage-3 step 7 while the step-6 checkpoint's asynchronous write is held back
    (it waits for step 7); Ray Train replaces the worker group, which resumes from the last complete checkpoint
    (step 3): each source's Ray Data split starts the checkpoint's epoch again and skips the rows already handed
    out, and the held evals' Ray reports go out once their checkpoint is complete — every eval equals the
    uninterrupted run's (1e-6), and every checkpoint left behind loads."""
    crashed = run_plan(small_cfg(prepared_root, tmp_path, "crash", *RAY_DATA, "train.faults.stage=stage3",
                                 "train.faults.checkpoint_write_lag_steps=1", "train.faults.crash_at_step=7",
                                 "train.faults.crash_rank=1"), resume="never")
    assert (crashed.run_dir / "faults" / "crash-stage3-7").exists()
    writes = (crashed.run_dir / "faults" / "checkpoint-writes").read_text()
    assert "stage3 6 began-at 7" in writes, writes  # the step-6 write was held until the step the crash hit
    _assert_same_metrics(crashed.run_dir, uninterrupted.run_dir)
    # each eval records the worker's own peak RSS (bench/data_memory.py reads it for its ray_data rows)
    assert all(r["host_peak_rss_mb"] > 100 for r in read_metrics(crashed.run_dir))
    names = [p.name for p in list_checkpoints(crashed.run_dir / "checkpoints")]
    assert names[-1] == "01-stage3-step000009"
    for name in names:
        load_trainer_state(crashed.run_dir / "checkpoints" / name)


def test_plan_runs_both_stages_and_reports(uninterrupted, prepared_root):
    res = uninterrupted
    assert list(res.summaries) == ["cpt", "stage3"]
    cpt, s3 = res.summaries["cpt"], res.summaries["stage3"]
    assert res.baseline_raw_best == pytest.approx(cpt["min_raw_val_loss"])
    assert s3["baseline_raw_best"] == pytest.approx(cpt["min_raw_val_loss"])
    recs = read_metrics(res.run_dir)
    s3_recs = [r for r in recs if r["stage"] == "stage3" and r["step"] > 0]
    for r in s3_recs:  # the metric contract
        for k in ("stage", "step", "tokens_seen", "train_loss", "raw_val_loss", "raw_val_ppl", "exam_val_loss", "kl",
                  "grad_norm", "lr", "tokens_per_s", "gate_ok", "gate_streak", "raw_ratio", "train_loss_qa_train",
                  "train_loss_raw_train"):
            assert k in r
        assert r["kl"] is not None and r["kl"] > 0
        assert r["raw_val_ppl"] == pytest.approx(math.exp(r["raw_val_loss"]), rel=1e-6)
        # exam accuracy: each of the 2 ranks scored its share; the gathered counts cover every item once
        (items,) = prepared_root.glob("qa_val-*/items.jsonl")
        assert r["exam_items_short"] == len(items.read_text(encoding="utf-8").splitlines()) and r["exam_items_mc"] == 0
        assert r["exam_acc"] is None and 0 <= r["exam_em"] <= 1 and 0 <= r["exam_f1"] <= 1
    # stage 3 started from the CPT best checkpoint: its step-0 eval equals the CPT best raw loss
    s3_start = next(r for r in recs if r["stage"] == "stage3" and r["step"] == 0)
    assert s3_start["raw_val_loss"] == pytest.approx(cpt["best_raw_val_loss"], abs=1e-6)
    manifest = read_manifest(res.best_checkpoints["stage3"])
    assert manifest["stage"] == "stage3" and len(manifest["tokenizer_sha256"]) == 64
    assert set(manifest["data_sha256"]) >= {"raw_train", "qa_train", "qa_val", "raw_val"}
    report = format_run_report(res.run_dir)
    assert "stage3" in report and "Pareto-optimal" in report
    assert (res.run_dir / "tb" / "stage3").is_dir()


def test_full_resume_refuses_changed_tokenizer_or_data(uninterrupted, prepared_root, tmp_path):
    run_dir = uninterrupted.run_dir
    assert list_checkpoints(run_dir / "checkpoints")
    config = (run_dir / "config.yaml").read_text()
    changed_data = small_cfg(prepared_root, tmp_path, "x", *RAY_DATA, "data.filters.min_chars=21")
    latest = re.escape(str(list_checkpoints(run_dir / "checkpoints")[-1]))
    with pytest.raises(CheckpointError, match=rf"^the checkpoint to resume from, {latest}, does not match this run "
                                              r"\(full restore\): data_sha256\['raw_train'\]"):
        run_plan(changed_data, run_dir=run_dir, resume="auto")
    changed_tok = small_cfg(prepared_root, tmp_path, "x", *RAY_DATA, "tokenizer.vocab_size=3000")
    with pytest.raises(CheckpointError, match="tokenizer_sha256"):
        run_plan(changed_tok, run_dir=run_dir, resume="auto")
    assert (run_dir / "config.yaml").read_text() == config  # a refused resume leaves the run's config as it was


def _assert_same_metrics(got_dir: Path, want_dir: Path) -> None:
    got_records = read_metrics(got_dir)
    got, want = _by_key(got_records), _by_key(read_metrics(want_dir))
    assert got.keys() == want.keys() and len(got_records) == len(got)  # no eval lost or recorded twice
    for key, w in want.items():
        for k in (*COMPARED, "rollbacks", "lr_scale"):
            a, b = got[key].get(k), w.get(k)
            if b is None:
                assert a is None, (key, k)
            else:
                assert a == pytest.approx(b, abs=1e-6, rel=0), (key, k, a, b)


def test_deterministic_abort_is_not_retried(ray_session, prepared_root, tmp_path):
    cfg = small_cfg(prepared_root, tmp_path, "abort", "train.faults.nan_at_step=3", "train.anomaly.max_rollbacks=0",
                    "train.max_failures=2")
    with pytest.raises(TrainingAborted) as err:
        run_plan(cfg, stages=["cpt"], resume="never")
    assert "\n" not in str(err.value) and "max_rollbacks = 0" in str(err.value)
    run_dir = tmp_path / "abort"
    # one attempt: the NaN step ran once (a retried worker group would have replayed it)
    assert (run_dir / "faults" / "fired-nan-cpt-3").read_text().count("fired") == 1
    assert [r["step"] for r in read_metrics(run_dir)] == [0]
    assert (run_dir / "aborted.json").is_file()


def test_a_kcpt_error_in_one_worker_ends_the_run_once_as_itself(ray_session, prepared_root, tmp_path):
    """A KcptError raised by rank 1 alone, mid-stage (rank 0 waits in a collective), is not retried by
    ``FailureConfig(max_failures=2)``: the worker group runs once, and run_plan raises the error itself with its
    one-line message. The run directory keeps its step-0 record and checkpoint. Under ZeRO-2: the raising rank
    leaves without DeepSpeed's closing barrier (with it both ranks hung, each in a collective)."""
    from kcpt.errors import InputError

    cfg = small_cfg(prepared_root, tmp_path, "input-error", "train.faults.stage=cpt",
                    "train.faults.input_error_at_step=3", "train.faults.crash_rank=1", "train.max_failures=2",
                    "train.deepspeed={zero_stage: 2}")
    with pytest.raises(InputError) as err:
        run_plan(cfg, stages=["cpt"], resume="never")
    assert type(err.value) is InputError
    assert str(err.value) == "injected fault: stage cpt step 3 (train.faults.input_error_at_step)"
    run_dir = tmp_path / "input-error"
    assert (run_dir / "faults" / "input-error-cpt-3").read_text().count("fired") == 1  # one attempt
    assert [r["step"] for r in read_metrics(run_dir)] == [0]


ONE_WORKER = ("train.num_workers=1", "train.max_failures=1", "train.async_checkpoint=false")
"""World size 1 for ``run_plan(in_task=True)``; blocking checkpoint writes: the step-4 checkpoint is complete when
step 5 starts, so where a retry resumes is fixed."""


@pytest.fixture(scope="module")
def in_process_one_worker(prepared_root, tmp_path_factory):
    return run_plan(small_cfg(prepared_root, tmp_path_factory.mktemp("one"), "in-process", *ONE_WORKER),
                    resume="never", in_process=True, console=False)


@pytest.mark.parametrize(("crash_step", "cpt_lines"), [(6, [0, 4, 8]), (2, [0, 0, 4, 8])],
                         ids=["after-a-checkpoint", "before-the-first-checkpoint"])
def test_in_task_run_killed_mid_stage_is_retried_and_resumes_exactly(ray_session, prepared_root, tmp_path, capsys,
                                                                     in_process_one_worker, crash_step, cpt_lines):
    """``run_plan(in_task=True)`` (world size 1, the tune's prerequisites): the one worker runs in a Ray task, not a
    TorchTrainer (no Train storage in the run dir), and its eval lines reach this console through the queue. When
    the task's process dies at CPT step 6, Ray runs it again and it resumes from the step-4 checkpoint; at step 2,
    before any checkpoint, it starts over and the first attempt's step-0 record is dropped. Either way every eval
    is recorded once and equals the in-process run's (1e-6)."""
    capsys.readouterr()
    got = run_plan(small_cfg(prepared_root, tmp_path, "in-task", *ONE_WORKER, "train.faults.stage=cpt",
                             f"train.faults.crash_at_step={crash_step}", "train.faults.crash_rank=0"),
                   resume="never", in_task=True)
    assert (got.run_dir / "faults" / f"crash-cpt-{crash_step}").exists()
    _assert_same_metrics(got.run_dir, in_process_one_worker.run_dir)
    assert not (got.run_dir / "ray").exists()  # no TorchTrainer ran
    lines = capsys.readouterr().out.splitlines()
    for stage, steps in (("cpt", cpt_lines), ("stage3", [0, 3, 6])):  # the retry's evals follow the first attempt's
        assert [int(ln.split()[2]) for ln in lines if ln.startswith(f"[{stage}] step")] == steps, stage
    # the console says that the run restarted and from where (it said nothing), when there was a checkpoint
    restarted = [ln for ln in lines if "restarted after a failure" in ln]
    if crash_step == 6:
        assert restarted == [f"[cpt] restarted after a failure (a worker or its node died; train.max_failures): "
                             f"resuming from {got.run_dir / 'checkpoints' / '00-cpt-step000004'}, step 4"], lines
    else:
        assert not restarted


def test_a_kcpt_error_in_a_world_size_1_rerun_task_is_raised_as_itself(ray_session, prepared_root, tmp_path):
    """At world size 1 a tune re-evaluation run is one Ray task (run_stage_trial → ``run_plan(in_task=True)``). A
    KcptError inside it (here an injected InputError at step 1) comes back as itself, with its one-line message
    (what reevaluate logs) and not retried — not as Ray's RayTaskError(InputError), a subclass of both whose message
    is the remote traceback. ``in_task`` itself refuses a world size above 1."""
    from kcpt.errors import ConfigError, InputError
    from kcpt.tune.launch import run_stage_trial

    cfg = small_cfg(prepared_root, tmp_path, "task", "train.num_workers=1", "train.faults.stage=stage3",
                    "train.faults.input_error_at_step=1", "plan.1.kl_beta=0")  # no CPT here: no KL reference
    with pytest.raises(InputError) as info:
        run_stage_trial(cfg, stage="stage3", run_dir=tmp_path / "task", init_checkpoint=None, baseline_raw_best=7.0,
                        reference_checkpoint=None, callbacks=[])
    assert type(info.value) is InputError and str(info.value).startswith("injected fault: stage stage3 step 1")
    assert "Traceback" not in str(info.value)
    assert [r["step"] for r in read_metrics(tmp_path / "task")] == [0]  # the step-0 eval, then the error
    assert (tmp_path / "task" / "faults" / "input-error-stage3-1").read_text().count("fired") == 1  # not retried
    with pytest.raises(ConfigError, match="in_task runs one worker"):
        run_plan(small_cfg(prepared_root, tmp_path, "two"), resume="never", in_task=True)


DS_FAULTS = ("train.faults.stage=stage3", "train.faults.nan_at_step=2", "train.faults.grad_spike_at_step=6",
             "train.faults.grad_spike_factor=1e6")


@pytest.mark.parametrize("zero_stage", [2, 3], ids=["2-offloaded-optimizer", "3"])
def test_deepspeed_at_parity_rollback_lr_cut_and_exact_resume(ray_session, prepared_root, tmp_path, capsys,
                                                             zero_stage):
    """Under ZeRO-2 (optimizer offloaded) and ZeRO-3: NaN and spike in stage 3 each roll back (LR scale 0.25 after
    both); stage 3 (restore: full) starts from CPT's optimizer state; the weights load as HF. Under ZeRO-3 (its
    checkpoint holds partitioned parameters as well as the partitioned optimizer state of ZeRO-2) a worker is killed
    at stage-3 step 5 and the group resumes from the step-3 checkpoint's DeepSpeed state; the 1-worker run below,
    which trains stage 3 from CPT's checkpoint without a kill, must record the same metrics (so the kill's resume
    was exact too).

    Then the run resumes on 1 worker (a node lost; no ``--force``: the same rows per step, 1 × 8 against 2 × 4;
    fewer is refused saying so): the node converts the 2 ranks' partitions to DeepSpeed's universal checkpoint and
    the worker loads the whole state from it — from stage 3's step-3 checkpoint under ZeRO-2, from CPT's last under
    ZeRO-3 (so stage 3's ``restore: full`` re-partitions too). At that global batch (the memory loader hands out the
    same rows at either world size; no dropout) every metric equals the run that went on at 2 ranks (1e-6 relative):
    weights, AdamW's moments and step count carried over exactly (before: refused on the driver). The converted
    copy is removed from node scratch once loaded; the new checkpoints hold one partition."""
    ds = f"train.deepspeed={{zero_stage: {zero_stage}{', offload_optimizer: true' if zero_stage == 2 else ''}}}"
    # no dropout and the memory loader: the same rows and math at another world size (the resume below); a strong
    # weight decay shows where DeepSpeed's ZeRO-3 universal load put it wrong
    same = (ds, "model.tiny.attention_dropout=0.0", "data.loader=memory", "train.weight_decay=0.3", *DS_FAULTS,
            *(("train.faults.crash_at_step=5", "train.faults.crash_rank=1") if zero_stage == 3 else ()))
    straight = run_plan(small_cfg(prepared_root, tmp_path, f"z{zero_stage}", *same), resume="never")
    assert (straight.run_dir / "faults" / "crash-stage3-5").exists() == (zero_stage == 3)
    s3 = straight.summaries["stage3"]
    assert s3["rollbacks"] == 2 and s3["lr_scale"] == 0.25
    recs = [r for r in read_metrics(straight.run_dir) if r["step"] > 0]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["grad_norm"]) for r in recs)
    best = straight.best_checkpoints["stage3"]
    assert (Path(best) / "engine" / "state").is_dir()
    assert "engine/state" in " ".join(read_manifest(best)["files"])   # bound by the checkpoint's manifest
    assert read_manifest(best)["engine"] == f"deepspeed-zero{zero_stage}"
    # a resume or a full restore by another engine is refused on the driver, --force or not, and the refused
    # command leaves the run's config.yaml as it was (DDP found no optimizer.pt inside the workers, another ZeRO
    # stage asserted inside DeepSpeed; config.yaml had been rewritten by then)
    config_before = (straight.run_dir / "config.yaml").read_bytes()
    with pytest.raises(CheckpointError, match=rf"written by DeepSpeed ZeRO-{zero_stage} .* this run trains with DDP "
                                              r"\(no train.deepspeed\), which cannot read it: resume with the run's "
                                              r"own train.deepspeed"):
        run_plan(small_cfg(prepared_root, tmp_path, f"z{zero_stage}", *DS_FAULTS), resume="auto", force=True)
    assert (straight.run_dir / "config.yaml").read_bytes() == config_before
    other = f"train.deepspeed={{zero_stage: {5 - zero_stage}}}"
    with pytest.raises(CheckpointError, match=rf"written by DeepSpeed ZeRO-{zero_stage} .* trains with DeepSpeed "
                                              rf"ZeRO-{5 - zero_stage} .*set plan stage 'stage3' restore: "
                                              r"weights_only"):
        run_plan(small_cfg(prepared_root, tmp_path, f"z{zero_stage}-other", other), stages=["stage3"],
                 init_checkpoint=best, baseline_raw_best=7.0, resume="never")
    from kcpt.model.loading import load_causal_lm  # the gathered (ZeRO-3) weights load as a normal HF model

    model = load_causal_lm(small_cfg(prepared_root, tmp_path, "x").model, path=best)
    assert model.get_input_embeddings().weight.shape[1] == 32
    _resume_on_one_worker(straight.run_dir, prepared_root, tmp_path, same, capsys,
                          start="00-cpt-step000008" if zero_stage == 3 else "01-stage3-step000003")


def _resume_on_one_worker(run_dir: Path, prepared_root: Path, tmp_path: Path, same: tuple[str, ...], capsys,
                          start: str) -> None:
    """The DeepSpeed run ``run_dir`` of 2 ranks, its checkpoints after ``start`` deleted (as a crash after that save
    leaves it), resumed on 1 worker: see the test above."""
    from kcpt import storage
    from kcpt.train.checkpoint import zero_world
    from kcpt.train.universal import copy_key

    want = read_metrics(run_dir)
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    for c in checkpoints[checkpoints.index(run_dir / "checkpoints" / start) + 1:]:
        shutil.rmtree(c)
    name = run_dir.name
    # fewer rows per step is another training: refused, saying what keeps it (--force would take it)
    with pytest.raises(CheckpointError, match=r"train\.num_workers: 2 → 1\. .*On another number of workers, keep "
                                              r"each stage's rows per step \(micro-batch · grad_accum · num_workers: "
                                              r"8, now 4\): a change of the layout alone then needs no --force"):
        run_plan(small_cfg(prepared_root, tmp_path, name, *same, "train.num_workers=1"), resume="auto")
    capsys.readouterr()
    run_plan(small_cfg(prepared_root, tmp_path, name, *same, "train.num_workers=1", "train.micro_batch_size=8"),
             resume="auto")
    out = capsys.readouterr().out
    assert "resuming with each step's rows laid out anew — train.num_workers 2 → 1, grad_accum 1 → 1, micro-batch " \
           "4 → 8 rows — the same rows per step (8)" in out, out
    assert f"{start}: its DeepSpeed ZeRO state is partitioned over 2 ranks and this run has 1 worker(s): each node " \
           "converts it once to DeepSpeed's universal checkpoint" in out, out
    got = read_metrics(run_dir)
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in want]
    for g, w in zip(got, want, strict=True):
        for k in (*COMPARED, "rollbacks", "lr_scale"):
            if w.get(k) is None:
                assert g.get(k) is None, (g["stage"], g["step"], k)
            else:
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-6), (g["stage"], g["step"], k, g[k], w[k])
    after = [c for c in sorted((run_dir / "checkpoints").iterdir()) if c.name > start]
    assert after and [zero_world(read_manifest(c)) for c in after] == [1] * len(after)  # saved at 1 worker
    key = copy_key(run_dir / "checkpoints" / start)
    assert not list(storage.scratch_root().parent.glob(f"node-*/universal/{key}"))  # removed once loaded



