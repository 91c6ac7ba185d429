"""Asynchronous checkpoints on real Ray Train (2 workers, DDP over gloo): a worker killed while a checkpoint write is
held back (the write waits for the next step) is replaced, the run resumes from the last complete checkpoint and
ends with the metrics of the run that was not killed (1e-6); the Ray reports of the held evals are sent once the
checkpoint is complete (the run finishes: every rank reported the same sequence)."""

from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from kcpt.config import load_config  # noqa: E402
from kcpt.train import checkpoint as ckpt_lib  # noqa: E402
from kcpt.train.launch import run_plan  # noqa: E402
from kcpt.train.rundir import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cfg_of(prepared: Path, out: Path, name: str, *extra: str):
    return load_config(None, [
        "data.seq_len=64", f"data.prepared_root={prepared}", "logging.progress=false", "logging.tensorboard=false",
        "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64", "model.tiny.attention_dropout=0.1", "train.micro_batch_size=4",
        "train.eval_batch_size=16", "train.max_eval_rows=32", "train.num_workers=2", "train.eval_at_start=false",
        f"train.output_dir={out}", f"train.run_name={name}", "tune.stage=s", "eval.exam_accuracy=false",
        "plan=[{name: s, sources: {raw_train: 1.0}, max_steps: 9, eval_every: 3, lr: {peak: 0.003, warmup_steps: 2}, "
        "stop: {rule: max_steps}}]", "train.faults.checkpoint_write_lag_steps=1", *extra])


def test_worker_killed_with_a_write_in_flight_resumes_exactly(ray_session, tmp_path):
    prepared = tmp_path / "prepared"
    straight = run_plan(cfg_of(prepared, tmp_path, "straight"), resume="never")
    # rank 1 dies at the start of step 7: the step-6 checkpoint's write is held until step 7 starts
    crashed = run_plan(cfg_of(prepared, tmp_path, "crash", "train.faults.crash_at_step=7",
                              "train.faults.crash_rank=1"), resume="never")
    assert (crashed.run_dir / "faults" / "crash-s-7").exists()
    got = {r["step"]: r for r in read_metrics(crashed.run_dir)}
    want = {r["step"]: r for r in read_metrics(straight.run_dir)}
    assert got.keys() == want.keys() == {3, 6, 9}
    for step, w in want.items():
        for k in ("train_loss", "raw_val_loss", "grad_norm", "lr", "tokens_seen"):
            assert got[step][k] == pytest.approx(w[k], abs=1e-6, rel=0), (step, k)
    names = [p.name for p in ckpt_lib.list_checkpoints(crashed.run_dir / "checkpoints")]
    assert names[-1] == "00-s-step000009"
    for name in names:
        ckpt_lib.load_trainer_state(crashed.run_dir / "checkpoints" / name)
