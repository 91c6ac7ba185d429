"""Asynchronous checkpoints (``train.async_checkpoint``): the host snapshot writes the same files as a live save
and is independent of the live weights; a write slowed by the fault hook does not hold the training steps back
(an order of events, no clock); the session (Ray) is only told of complete checkpoints; a writer failure is
raised on the training thread naming the checkpoint, leaving the earlier checkpoints intact; and a run resumed
from an async checkpoint continues exactly as the uninterrupted run. All in-process (the loop on real Ray:
tests/test_train_ray.py runs with the default, async)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_child import tiny_llama
from safetensors.torch import load_file

from kcpt.config import load_config
from kcpt.data.prepare import prepare_all
from kcpt.errors import CheckpointError
from kcpt.train import checkpoint as ckpt_lib
from kcpt.train.launch import run_plan
from kcpt.train.loop import LocalSession, datasets_needed, stage_loop_per_worker
from kcpt.train.rundir import RunDir, read_metrics

BASE = [
    "data.seq_len=64", "logging.progress=false", "logging.tensorboard=false",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64", "train.micro_batch_size=4", "train.eval_batch_size=16",
    "train.max_eval_rows=32", "train.num_workers=1", "train.eval_at_start=false", "tune.stage=s",
    "eval.exam_accuracy=false",
]
PLAN = ('plan=[{name: s, sources: {raw_train: 1.0}, max_steps: 12, eval_every: 4, '
        'lr: {peak: 0.003, warmup_steps: 2}, stop: {rule: max_steps}}]')


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepared")


def cfg_of(prepared_root: Path, out: Path, *extra: str):
    return load_config(None, [*BASE, f"data.prepared_root={prepared_root}", f"train.output_dir={out}",
                              "train.run_name=r", PLAN, *extra])


class CompleteOnlySession(LocalSession):
    """Records reports; fails the run if a report names a checkpoint that is not complete at that moment."""

    def report(self, metrics, ckpt_path, rank):
        if ckpt_path is not None:
            ckpt_lib.read_manifest(ckpt_path)  # CheckpointError: incomplete / missing
        super().report(metrics, ckpt_path, rank)


def run_with_session(cfg, session) -> Path:
    """The stage loop in this process with ``session`` (what ``run_plan(in_process=True)`` does, minus the
    console), on a fresh run directory."""
    stages = ["s"]
    prepared = prepare_all(cfg, datasets_needed(cfg, stages), progress=False)
    rd = RunDir(Path(cfg.train.output_dir) / cfg.train.run_name)
    rd.start_over()
    rd.create(cfg)
    stage_loop_per_worker({"cfg": cfg.model_dump(mode="json"), "stages": stages, "run_dir": rd.location,
                           "prepared": {k: str(v) for k, v in prepared.items()}, "init_checkpoint": None,
                           "reference_checkpoint": None, "baseline_raw_best": None, "resume_from": None}, session)
    return rd.root


def test_host_snapshot_writes_the_live_files_and_is_independent_of_the_live_weights(tmp_path):
    model = tiny_llama(seed=3, tie=True)             # tied embeddings: two state-dict keys, one storage
    sd = model.state_dict()
    snap = ckpt_lib.HostSnapshot().take({"model": sd}).wait()["model"]
    assert snap["lm_head.weight"] is snap["model.embed_tokens.weight"]   # the tie survives the copy
    ckpt_lib.default_save_model(model, tmp_path / "live")
    with torch.no_grad():                           # training goes on after the snapshot
        for p in model.parameters():
            p.add_(1.0)
    ckpt_lib.state_dict_saver(snap)(model, tmp_path / "snap")
    live = load_file(tmp_path / "live" / "model.safetensors")
    copied = load_file(tmp_path / "snap" / "model.safetensors")
    assert live.keys() == copied.keys()
    assert all(torch.equal(live[k], copied[k]) for k in live)


def test_slow_write_does_not_hold_back_the_steps_and_ray_sees_only_complete_checkpoints(prepared_root, tmp_path):
    """Each write waits until training ran 2 steps past its save: the steps went on while it was in flight
    (recorded "by progress"); the last one of the stage is released by the stage-end join. Every report that
    names a checkpoint came when that checkpoint was complete, one report per eval, in order."""
    session = CompleteOnlySession()
    root = run_with_session(cfg_of(prepared_root, tmp_path, "train.faults.checkpoint_write_lag_steps=2"), session)
    writes = (root / "faults" / "checkpoint-writes").read_text().split("\n")
    assert writes[:-1] == ["s 4 began-at 6 by progress", "s 8 began-at 10 by progress", "s 12 began-at 12 by join"]
    assert [r["step"] for r in session.reports] == [4, 8, 12]
    assert [Path(r["checkpoint"]).name for r in session.reports] == [f"00-s-step{k:06d}" for k in (4, 8, 12)]
    assert [r["step"] for r in read_metrics(root)] == [4, 8, 12]
    for ck in ckpt_lib.list_checkpoints(root / "checkpoints"):
        ckpt_lib.verify_weights(ck)
        ckpt_lib.load_trainer_state(ck)


def test_writer_failure_is_raised_on_the_training_thread_naming_the_checkpoint(prepared_root, tmp_path):
    cfg = cfg_of(prepared_root, tmp_path, "train.faults.checkpoint_write_error_at_step=8")
    with pytest.raises(CheckpointError, match=r"asynchronous checkpoint write of .*00-s-step000008 failed: "
                                              r"OSError: injected checkpoint write failure.*The run's earlier "
                                              r"checkpoints are intact: check the free space .*then run the same "
                                              r"command with --resume"):
        run_plan(cfg, resume="never", in_process=True)
    ckpts = tmp_path / "r" / "checkpoints"
    assert [p.name for p in ckpt_lib.list_checkpoints(ckpts)] == ["00-s-step000004"]  # the good one, intact
    assert not list(ckpt_lib.iter_incomplete(ckpts))                             # nothing half-written visible
    ckpt_lib.verify_weights(ckpts / "00-s-step000004")


def test_resume_from_an_async_checkpoint_is_exact(prepared_root, tmp_path):
    """A run stopped by an error at step 10 (checkpoints 4 and 8 written asynchronously, each only after the next
    step ran: the snapshot, not the live state, is written) and resumed ends with the metrics of the run that was
    not stopped (1e-6)."""
    straight = run_plan(cfg_of(prepared_root, tmp_path / "a"), resume="never", in_process=True)
    broken = cfg_of(prepared_root, tmp_path / "b", "train.faults.raise_at_step=10",
                    "train.faults.checkpoint_write_lag_steps=1")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_plan(broken, resume="never", in_process=True)
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "b" / "r" / "checkpoints")][-1] == "00-s-step000008"
    # the fault is part of the config hash: --force resumes with it removed
    resumed = run_plan(cfg_of(prepared_root, tmp_path / "b"), resume="auto", in_process=True, force=True)
    got = {r["step"]: r for r in read_metrics(resumed.run_dir)}
    want = {r["step"]: r for r in read_metrics(straight.run_dir)}
    assert got.keys() == want.keys() == {4, 8, 12}
    for step, w in want.items():
        for k in ("train_loss", "raw_val_loss", "grad_norm", "lr", "tokens_seen"):
            assert got[step][k] == pytest.approx(w[k], abs=1e-6, rel=0), (step, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_snapshot_is_ordered_before_later_kernels():
    """Non-blocking copies into pinned buffers on the current stream: an in-place update queued after
    ``take`` does not reach the copy; a second take reuses the pinned buffers."""
    hs = ckpt_lib.HostSnapshot()
    w = torch.randn(1024, 1024, device="cuda")
    want = w.cpu()
    snap = hs.take({"w": w, "tied": w})
    w.mul_(3.0)                                   # queued after the copy
    got = snap.wait()
    assert got["w"] is got["tied"] and got["w"].is_pinned()
    assert torch.equal(got["w"], want)
    buf = got["w"]
    assert hs.take({"w": w, "tied": w}).wait()["w"] is buf


def test_a_resume_refused_inside_the_loop_leaves_config_yaml_as_it_was(prepared_root, tmp_path):
    """``config.yaml`` is the config the run's checkpoints were made with. A resume (``--force``, a changed config)
    that the loop refuses before it saves anything (here an InputError injected at step 7, resumed from step 4)
    puts it back; one that saved a checkpoint first (refused at step 10, after the step-8 checkpoint) keeps the
    new config, which that checkpoint was made with."""
    from kcpt.errors import InputError

    with pytest.raises(InputError):
        run_plan(cfg_of(prepared_root, tmp_path, "train.faults.input_error_at_step=6"), resume="never",
                 in_process=True)
    config = tmp_path / "r" / "config.yaml"
    before = config.read_bytes()
    assert b"input_error_at_step: 6" in before
    with pytest.raises(InputError, match="step 7"):
        run_plan(cfg_of(prepared_root, tmp_path, "train.faults.input_error_at_step=7"), resume="auto",
                 in_process=True, force=True)
    assert config.read_bytes() == before
    with pytest.raises(InputError, match="step 10"):
        run_plan(cfg_of(prepared_root, tmp_path, "train.faults.input_error_at_step=10"), resume="auto",
                 in_process=True, force=True)
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "r" / "checkpoints")][-1].endswith("step000008")
    assert b"input_error_at_step: 10" in config.read_bytes()
