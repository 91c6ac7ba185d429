"""Shared fixtures. Ray tests use a real local Ray with explicit num_cpus and shut it down."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------- tuning (H4)
# ONE real tune experiment (real stage loop: CPT → stage 1 → stage 2 once, then stage-3 trials) shared by
# test_tune_stage3.py, test_notebook.py and test_job_submit.py (which reuses its prerequisite checkpoints).

# Small plan: prerequisites in ~1-2 min on 2 cores; stage-3 trials of a few evals each.
TUNE_TEST_OVERRIDES = [
    "plan.0.max_steps=30", "plan.0.eval_every=10",
    "plan.1.max_steps=20", "plan.1.eval_every=10",
    "plan.2.max_steps=20", "plan.2.eval_every=10",
    "tune.stage_overrides.max_steps=16", "tune.stage_overrides.eval_every=4",
    "tune.n_startup_trials=2", "tune.asha.grace_period=2",
    "train.num_workers=1", "logging.progress=false",
]


@pytest.fixture(scope="session")
def tune_experiment(tmp_path_factory):
    """A finished stage-3 tune experiment (3 trials) made by :func:`kcpt.tune.launch.tune_stage3`."""
    from types import SimpleNamespace

    from kcpt.config import load_config
    from kcpt.tune.launch import tune_stage3

    root = tmp_path_factory.mktemp("tune")
    overrides = [*TUNE_TEST_OVERRIDES, f"train.output_dir={root / 'runs'}", f"data.prepared_root={root / 'prepared'}",
                 "tune.num_samples=3"]
    cfg = load_config(None, overrides)
    result = tune_stage3(cfg, experiment_dir=root / "exp", verbose=0)
    return SimpleNamespace(root=root, overrides=overrides, result=result, exp_dir=result.experiment_dir, cfg=cfg)
