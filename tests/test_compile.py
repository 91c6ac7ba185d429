"""``train.compile: true`` compiles each decoder layer (in place: checkpoints unchanged) and trains like eager:
the real stage loop in-process, a few steps, the same losses within float tolerance."""

from __future__ import annotations

import pytest

from kcpt.config import load_config
from kcpt.train import loop
from kcpt.train.launch import run_plan
from kcpt.train.rundir import read_metrics

BASE = ["data.seq_len=64", "logging.progress=false", "logging.tensorboard=false", "model.tiny.hidden_size=32",
        "model.tiny.num_layers=2", "model.tiny.num_heads=2", "model.tiny.intermediate_size=64",
        "train.micro_batch_size=4", "train.eval_batch_size=4", "train.max_eval_rows=8", "train.num_workers=1",
        "train.eval_at_start=false", "tune.stage=s"]
PLAN = "[{name: s, sources: {raw_train: 1.0}, max_steps: 4, eval_every: 2, stop: {rule: max_steps}}]"


def _run(prepared_root, out, *extra):
    cfg = load_config(None, [*BASE, f"data.prepared_root={prepared_root}", f"train.output_dir={out}",
                             "train.run_name=r", f"plan={PLAN}", *extra])
    res = run_plan(cfg, resume="never", in_process=True)
    return [r for r in read_metrics(res.run_dir) if r["step"] > 0]


def test_compiled_layers_train_like_eager(tmp_path, monkeypatch):
    prepared = tmp_path / "prepared"
    compiled: list[bool] = []
    orig = loop.StageRunner.build_engine

    def build_engine(self, model, stage):
        compiled.append(all(layer._compiled_call_impl is not None for layer in model.model.layers))
        return orig(self, model, stage)

    monkeypatch.setattr(loop.StageRunner, "build_engine", build_engine)
    eager = _run(prepared, tmp_path / "eager")
    comp = _run(prepared, tmp_path / "compiled", "train.compile=true")
    assert compiled == [False, True]
    assert len(eager) == len(comp) == 2
    for a, b in zip(eager, comp, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["raw_val_loss"] == pytest.approx(a["raw_val_loss"], rel=1e-4)
    assert comp[-1]["train_loss"] != eager[0]["train_loss"]  # it trained
