"""A resumed tune experiment runs more trials when ``tune.num_samples`` grew: a second Tune run on the same study
(real Ray Tune + Optuna; the trials' stage loop is a stand-in here, the experiment's plumbing is under test — the
real loop under resume is test_tune_cluster's)."""

from __future__ import annotations

import json
import sys

import optuna
import pandas as pd
import pytest
from conftest import TUNE_TEST_OVERRIDES
from optuna.trial import TrialState
from ray import cloudpickle

from kcpt.config import load_config
from kcpt.errors import InputError
from kcpt.tune.experiment import default_experiment_dir, resolve_experiment

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trial actors cannot import tests/


def scripted_stage(cfg, *, stage, run_dir, **_):
    """Writes the evals a stage-3 run with ``cfg``'s LR would have: the exam falls faster with a higher LR."""
    from pathlib import Path

    lr = cfg.stage(stage).lr.peak
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    evals = [{"stage": stage, "step": 4 * k, "tokens_seen": 1024 * k, "raw_ratio": 1.0,
              "raw_val_loss": 7.0, "exam_val_loss": 4.0 - k * lr * 500} for k in range(5)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))


@pytest.fixture
def ray_local():
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False)  # one Ray for the test's four tune runs
    yield
    ray.shutdown()


def test_resume_with_more_num_samples_adds_trials_to_the_same_experiment(ray_local, tmp_path, capsys):
    from kcpt.tune.launch import Prerequisites, tune_stage3

    exp = tmp_path / "exp"
    pre = Prerequisites(tmp_path / "pre", None, 7.0)  # the stand-in stage needs no start checkpoint
    base = [*TUNE_TEST_OVERRIDES, f"data.prepared_root={tmp_path / 'prepared'}", "tune.reeval.top_k=0"]

    def run(n: int, *extra: str, resume: bool = False):
        cfg = load_config(None, [*base, f"tune.num_samples={n}", *extra])
        return tune_stage3(cfg, experiment_dir=exp, runner=scripted_stage, prerequisites=pre, sampler="random",
                           resume=resume, verbose=0)

    def study():
        return optuna.load_study(study_name="kcpt-stage3", storage=f"sqlite:///{exp / 'optuna.db'}")

    run(2)
    first = study().get_trials()
    assert len(first) == 2 and all(t.state == TrialState.COMPLETE for t in first)

    capsys.readouterr()
    run(4, resume=True)
    out = capsys.readouterr().out
    assert "tune.num_samples is 4: 2 more trial(s) on the study (Tune's run tune-2)" in out
    assert "| 3/4 done" in out and "| 4/4 done" in out  # the console counts on from the first run's trials
    trials = study().get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state == TrialState.COMPLETE for t in trials)
    assert [t.params for t in trials[:2]] == [t.params for t in first]       # the first run's trials kept
    # the added run's sampler is seeded afresh: random search drew trial 1's point again with the same seed
    assert trials[2].params != trials[1].params and trials[3].params != trials[1].params
    m = json.loads((exp / "experiment.json").read_text())
    assert m["tune_runs"] == [{"name": "tune", "num_samples": 2}, {"name": "tune-2", "num_samples": 2}]
    assert {t.user_attrs["trial_dir"].split("/")[-2] for t in trials} == {"tune", "tune-2"}
    assert len(pd.read_parquet(exp / "trials.parquet")) == 4

    run(4, resume=True)                                    # nothing to add: the last Tune run is restored, finished
    assert len(study().get_trials()) == 4
    assert json.loads((exp / "experiment.json").read_text())["tune_runs"] == m["tune_runs"]

    with pytest.raises(InputError, match=r"fewer trials: the experiment asked for 4 .*--num-samples 4 or more"):
        run(3, resume=True)
    with pytest.raises(InputError, match=r"another config \(changed: tune.sampler_seed: 0 → 1\)"):
        run(5, "tune.sampler_seed=1", resume=True)
    assert len(study().get_trials()) == 4


def test_num_samples_names_the_same_default_experiment_directory(tmp_path):
    """``kcpt tune --resume --num-samples 8`` must find the experiment ``kcpt tune`` made (its directory name is a
    config hash: with num_samples in it, the resume started a new experiment elsewhere)."""
    over = [f"tune.experiment_dir={tmp_path}"]
    a, b = (resolve_experiment(load_config(None, [*over, f"tune.num_samples={n}"]))[1] for n in (6, 8))
    assert a == b
    c = resolve_experiment(load_config(None, [*over, "tune.sampler_seed=3"]))[1]
    assert c != a                                          # another search is another experiment
    # an experiment named before (by the full config hash) keeps its name
    cfg = resolve_experiment(load_config(None, over))[0]
    legacy = tmp_path / f"{cfg.tune.study_name}-{cfg.sha256()[:8]}"
    legacy.mkdir()
    (legacy / "experiment.json").write_text("{}")
    assert default_experiment_dir(cfg) == legacy
