"""Tune at cluster scale: trial world size, the llama-gpu tune block, Optuna storages (SQLite, journal file,
PostgreSQL), two concurrent trials, and an experiment whose driver is SIGKILLed mid-trial resumed with --resume.

The Ray tests reuse the session experiment's prerequisite checkpoints (``tune_experiment`` in conftest) and run
the real stage loop in every trial.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from kcpt.cli import main as kcpt_main
from kcpt.config import dump_config, load_config
from kcpt.errors import ConfigError, InputError
from kcpt.tune.experiment import accounted_trials, check_experiment, clear_experiment, fail_interrupted_trials
from kcpt.tune.study_storage import open_storage, redact, resolve_storage, study_exists

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- config (no Ray)


def test_trials_train_at_the_final_world_size_by_default():
    from kcpt.tune.launch import ray_cpus_needed, trial_in_actor, trial_resources

    cfg = load_config(None)
    assert cfg.tune.num_workers is None and cfg.tune_workers() == cfg.train.num_workers == 2
    assert not trial_in_actor(cfg) and trial_resources(cfg) == {"CPU": 1.0}  # the actor runs a TorchTrainer
    assert ray_cpus_needed(cfg) == 3  # 1 x (trial actor + 2 workers)
    cfg = load_config(None, ["train.num_workers=1", "tune.max_concurrent=4"])
    # world size 1: the trial's actor runs the loop and holds the worker's CPUs (no TorchTrainer)
    assert cfg.tune_workers() == 1 and trial_in_actor(cfg) and ray_cpus_needed(cfg) == 4
    assert trial_resources(cfg) == {"CPU": 1.0, "GPU": 0.0}
    cfg = load_config(None, ["train.num_workers=1", "train.cpus_per_worker=2", "train.use_gpu=true"])
    assert trial_resources(cfg) == {"CPU": 2.0, "GPU": 1.0}
    cfg = load_config(None, ["train.num_workers=1", "tune.max_concurrent=4", "train.deepspeed.zero_stage=2"])
    assert not trial_in_actor(cfg) and ray_cpus_needed(cfg) == 8  # DeepSpeed: its TorchTrainer's process group
    cfg = load_config(None, ["tune.num_workers=3"])
    assert cfg.tune_workers() == 3 and cfg.train.num_workers == 2
    with pytest.raises(ConfigError, match="tune.num_workers"):
        load_config(None, ["tune.num_workers=0"])


def test_llama_gpu_tune_block_fits_a_1b_model():
    cfg = load_config(REPO / "jobs/configs/llama-gpu.yaml")
    t = cfg.tune
    st3 = cfg.stage(t.stage)
    assert t.num_workers is None and cfg.tune_workers() == cfg.train.num_workers == 8
    assert t.space.lr.low <= st3.lr.peak <= t.space.lr.high and t.space.lr.log
    assert t.space.lr.low == pytest.approx(3e-6) and t.space.lr.high == pytest.approx(1e-4)
    for name in ("stage1", "stage2", "stage3"):
        st = cfg.stage(name)
        assert st.sources.get(t.space.raw_source, 0) > 0, f"{name}: no raw replay"
        assert t.space.kl_beta.low <= st.kl_beta <= t.space.kl_beta.high, f"{name}: β outside the tuned range"
        assert st.kl_reference == "cpt_best"
    assert t.max_concurrent == 2 and t.num_samples >= 4 * t.max_concurrent and t.n_startup_trials < t.num_samples
    assert resolve_storage(t.storage, "/shared/x").startswith("journal:///shared/x/")
    assert Path(t.experiment_dir).is_absolute()


# --------------------------------------------------------------------------- storages and experiment policy


def test_storage_forms(tmp_path):
    exp = tmp_path / "exp"
    assert resolve_storage(None, exp) == resolve_storage("sqlite", exp) == f"sqlite:///{exp / 'optuna.db'}"
    assert resolve_storage("journal", exp) == f"journal://{exp / 'optuna.journal'}"
    url = "postgresql+psycopg2://kcpt:secret@db.internal:5432/optuna"
    assert resolve_storage(url, exp) == url and redact(url) == "postgresql+psycopg2://kcpt:***@db.internal:5432/optuna"
    with pytest.raises(ConfigError, match="must be absolute"):
        resolve_storage("journal://relative/file.journal", exp)
    with pytest.raises(ConfigError, match="is not a storage"):
        resolve_storage("postgres", exp)
    with pytest.raises(ConfigError, match=r"cannot open the Optuna storage postgresql\+psycopg2://kcpt:\*\*\*@") as e:
        open_storage("postgresql+psycopg2://kcpt:secret@127.0.0.1:1/optuna")  # nothing listens on port 1
    assert "secret" not in str(e.value)
    journal = resolve_storage("journal", exp)
    assert not study_exists(journal, "s")  # no file yet: nothing created
    assert not (exp / "optuna.journal").exists()
    study = optuna.create_study(study_name="s", storage=open_storage(journal))
    study.optimize(lambda tr: tr.suggest_float("x", 0, 1), n_trials=2)
    assert isinstance(open_storage(journal), optuna.storages.JournalStorage)
    assert study_exists(journal, "s") and accounted_trials(journal, "s") == 2
    assert len(optuna.load_study(study_name="s", storage=open_storage(journal)).trials) == 2  # a second reader


def _experiment(exp: Path, storage: str, sha: str = "abc") -> None:
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "experiment.json").write_text(json.dumps({"storage": storage, "config_sha256": sha}), encoding="utf-8")


def test_existing_experiment_needs_resume_or_overwrite(tmp_path, capsys, monkeypatch):
    exp = tmp_path / "exp"
    url = resolve_storage(None, exp)
    assert check_experiment(exp, storage_url=url, study_name="s") == "new"
    assert check_experiment(exp, storage_url=url, study_name="s", resume=True) == "new"
    _experiment(exp, url)
    (exp / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="--resume .*--overwrite"):
        check_experiment(exp, storage_url=url, study_name="s")
    assert check_experiment(exp, storage_url=url, study_name="s", resume=True, config_sha256="abc") == "resume"
    with pytest.raises(InputError, match="another config"):
        check_experiment(exp, storage_url=url, study_name="s", resume=True, config_sha256="def")
    # with its config.yaml the check compares what identifies the experiment: more trials may be asked for, not
    # fewer, and a refusal names what changed
    dump_config(load_config(), exp / "config.yaml")
    assert check_experiment(exp, storage_url=url, study_name="s", resume=True, config_sha256="def",
                            config=load_config(None, ["tune.num_samples=8", "tune.max_concurrent=2"])) == "resume"
    with pytest.raises(InputError, match=r"fewer trials: the experiment asked for 6 .*--num-samples 6 or more"):
        check_experiment(exp, storage_url=url, study_name="s", resume=True, config_sha256="def",
                         config=load_config(None, ["tune.num_samples=4"]))
    with pytest.raises(InputError, match=r"another config \(changed: tune.sampler_seed: 0 → 2\).*may change only "
                                         r"tune.num_samples"):
        check_experiment(exp, storage_url=url, study_name="s", resume=True, config_sha256="def",
                         config=load_config(None, ["tune.num_samples=8", "tune.sampler_seed=2"]))
    with pytest.raises(InputError, match="pass the same --storage"):
        check_experiment(exp, storage_url=resolve_storage("journal", exp), study_name="s", resume=True)
    assert check_experiment(exp, storage_url=url, study_name="s", overwrite=True) == "overwrite"
    # a study already in a shared storage counts too, even with a fresh experiment directory
    journal = f"journal://{tmp_path / 'shared' / 'optuna.journal'}"
    optuna.create_study(study_name="s", storage=open_storage(journal)).ask()
    with pytest.raises(InputError, match="study 's' in journal://"):
        check_experiment(tmp_path / "fresh", storage_url=journal, study_name="s")
    # the CLI refuses before importing Ray: one line, exit 2
    monkeypatch.setitem(sys.modules, "kcpt.tune.launch", None)
    cfg = load_config(None)
    from kcpt.tune.experiment import resolve_experiment

    _, _, cli_url = resolve_experiment(cfg, exp)
    _experiment(exp, cli_url)
    assert kcpt_main(["tune", "--experiment-dir", str(exp)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--resume" in err and "--overwrite" in err and str(exp) in err
    # --overwrite deletes the study and kcpt's files, never the user's
    url_study = optuna.create_study(study_name="s", storage=open_storage(url))
    url_study.ask()
    (exp / "tune").mkdir()
    (exp / "tune-2").mkdir()  # a Tune run a grown resume added (listed in the manifest) goes too
    (exp / "tune-3").mkdir()  # not listed: not kcpt's
    m = json.loads((exp / "experiment.json").read_text())
    (exp / "experiment.json").write_text(json.dumps({**m, "tune_runs": [{"name": "tune", "num_samples": 2},
                                                                        {"name": "tune-2", "num_samples": 2},
                                                                        {"name": "../mine.txt", "num_samples": 1}]}))
    clear_experiment(exp, storage_url=url, study_name="s")
    assert not (exp / "experiment.json").exists() and not (exp / "tune").exists() and not (exp / "tune-2").exists()
    assert (exp / "tune-3").is_dir()
    assert not study_exists(url, "s") and (exp / "mine.txt").read_text() == "keep"


def test_running_trials_left_behind_are_marked_failed(tmp_path):
    url = resolve_storage("journal", tmp_path)
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    done = study.ask()
    study.tell(done, 1.0)
    orphan = study.ask()
    assert fail_interrupted_trials(url, "s") == [orphan.number]
    t = optuna.load_study(study_name="s", storage=open_storage(url)).trials
    assert [x.state for x in t] == [TrialState.COMPLETE, TrialState.FAIL] and t[1].user_attrs["interrupted"]
    assert fail_interrupted_trials(url, "s") == []


def test_a_shared_study_tells_each_experiment_its_own_trials(tmp_path):
    """Two experiments on one study (--storage + --study-name): each counts, and at its end fails, only the trials
    it asked for (another driver's running trial was failed under it); --overwrite never deletes the other's
    trials; a new experiment directory on the existing study is told to --resume into it."""
    from kcpt.tune.experiment import OWNER_ATTR

    url = resolve_storage("journal", tmp_path)
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    trials = {}
    for name, owner in (("a_done", "A"), ("b_running", "B"), ("a_orphan", "A")):
        trials[name] = study.ask()
        trials[name].set_user_attr(OWNER_ATTR, owner)
    study.tell(trials["a_done"], 1.0)
    assert accounted_trials(url, "s", "A") == 1 and accounted_trials(url, "s", "B") == 0
    assert fail_interrupted_trials(url, "s", "A") == [trials["a_orphan"].number]
    states = {t.number: t.state for t in optuna.load_study(study_name="s", storage=open_storage(url)).trials}
    assert states[trials["b_running"].number] == TrialState.RUNNING  # B's trial runs on
    with pytest.raises(InputError, match=r"study 's'.*already exists \(trials of A\).*--resume to add"):
        check_experiment(tmp_path / "b", storage_url=url, study_name="s", owner="B")
    assert check_experiment(tmp_path / "b", storage_url=url, study_name="s", resume=True, owner="B") == "resume"
    with pytest.raises(InputError, match=r"--overwrite would delete study 's'.*holds the trials of A"):
        check_experiment(tmp_path / "b", storage_url=url, study_name="s", overwrite=True, owner="B")
    assert study_exists(url, "s") and len(optuna.load_study(study_name="s", storage=open_storage(url)).trials) == 3
    failed = study.ask()  # a trial that ran and errored counts towards num_samples; one marked interrupted does not
    failed.set_user_attr(OWNER_ATTR, "A")
    study.tell(failed, state=TrialState.FAIL)
    assert accounted_trials(url, "s", "A") == 2


# --------------------------------------------------------------------------- real tunes (Ray, stage loop)


def _base_overrides(tune_experiment) -> list[str]:
    return [o for o in tune_experiment.overrides if not o.startswith("tune.num_samples")]


def _assert_study_consistent(exp: Path, study: optuna.Study, num_samples: int) -> list[optuna.trial.FrozenTrial]:
    """Trial numbers 0..n-1 once each; num_samples of them COMPLETE/PRUNED, the rest FAIL(interrupted); one Optuna
    trial per Ray trial; trials.parquet row for row the study."""
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.number for t in trials] == list(range(len(trials)))
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == num_samples
    for t in trials:
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
            t.state == TrialState.FAIL and t.user_attrs.get("interrupted")), (t.number, t.state)
    ray_ids = [t.user_attrs.get("ray_trial_id") for t in done]
    assert None not in ray_ids and len(set(ray_ids)) == len(ray_ids)
    df = pd.read_parquet(exp / "trials.parquet")
    assert list(df["trial_number"]) == [t.number for t in trials]
    assert list(df["status"]) == [t.state.name for t in trials]
    return trials


@pytest.mark.slow
def test_two_concurrent_trials_on_postgres(tune_experiment, tmp_path):
    import pgserver  # the dev extra installs it (and kcpt[postgres])

    from kcpt.tune.launch import tune_stage3

    server = pgserver.get_server(tmp_path / "pg", cleanup_mode="stop")
    try:
        url = server.get_uri().replace("postgresql://", "postgresql+psycopg2://", 1)
        # the storage and the concurrency, not the search: 8 steps per trial (evals at 0, 4, 8) are enough
        cfg = load_config(None, [*_base_overrides(tune_experiment), "tune.num_samples=2", "tune.max_concurrent=2",
                                 "tune.stage_overrides.max_steps=8", "tune.stage_overrides.stop.consecutive=2",
                                 f"tune.storage={url}",
                                 "tune.study_name=pg-study"])
        res = tune_stage3(cfg, experiment_dir=tmp_path / "exp", prerequisites=tune_experiment.result.prerequisites,
                          verbose=0)
        manifest = json.loads((res.experiment_dir / "experiment.json").read_text())
        assert manifest["storage"] == url and not (res.experiment_dir / "optuna.db").exists()
        study = optuna.load_study(study_name="pg-study", storage=url)  # read back from the server
        a, b = _assert_study_consistent(res.experiment_dir, study, 2)
        assert all("raw_gate" in t.constraints for t in (a, b))
        # both trials were running at once: each was asked for before the other was told
        assert a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
        for t in (a, b):  # each trial trained at the configured world size (train.num_workers here)
            trial_cfg = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "config.yaml").read_text())
            assert trial_cfg["train"]["num_workers"] == cfg.tune_workers() == 1
    finally:
        server.cleanup()


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _trial_evals(exp: Path) -> int:
    n = 0
    for p in (exp / "runs").glob("*/metrics.jsonl"):
        for line in p.read_text().splitlines():
            try:
                m = json.loads(line)
            except ValueError:
                continue  # a line being written
            n += m.get("stage") == "stage3" and m.get("step", 0) > 0
    return n


def _driver_in_a_trial(tune_experiment, exp: Path, study: str, log: Path, trials: int = 2
                       ) -> tuple[list[str], subprocess.Popen, set[int]]:
    """A real ``jobs/tune_stage3.py`` driver (``trials`` trials of 8 steps: the resume, not the search; its console
    into ``log``), returned once a trial is running and has reported an eval: its arguments, the process, and the
    processes under it so far (the local Ray it started)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sets = [a for o in (*_base_overrides(tune_experiment), "tune.stage_overrides.max_steps=8",
                                               "tune.stage_overrides.stop.consecutive=2") for a in ("--set", o)]
    args = ["--experiment-dir", str(exp), "--storage", "journal", "--num-samples", str(trials), "--study-name", study,
            *sets]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "jobs/tune_stage3.py", *args], cwd=REPO, env=env,
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    tree: set[int] = set()
    try:
        deadline = time.time() + 300
        while _trial_evals(exp) < 1:
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "no trial reported an eval"
            tree.update(_descendants(driver.pid))
            time.sleep(0.5)
        tree.update(_descendants(driver.pid))
    except BaseException:
        _kill([driver.pid, *tree])
        raise
    return args, driver, tree


@pytest.mark.slow
def test_driver_killed_mid_trial_resumes_without_lost_or_duplicated_trials(tune_experiment, tmp_path, capsys):
    exp = tmp_path / "exp"
    args, driver, tree = _driver_in_a_trial(tune_experiment, exp, "resumed", tmp_path / "driver.log")
    try:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, and the local Ray it started, die mid-trial
        driver.wait()
    finally:
        _kill([driver.pid, *tree])
    url = resolve_storage("journal", exp)
    before = optuna.load_study(study_name="resumed", storage=open_storage(url)).get_trials()
    running = [t for t in before if t.state == TrialState.RUNNING]
    assert running, [t.state for t in before]  # killed mid-trial
    assert not (exp / "trials.parquet").exists()

    # without --resume: refused, naming both ways on
    assert kcpt_main(["tune", *args]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err

    assert kcpt_main(["tune", *args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"tune experiment {exp}: resume" in out
    study = optuna.load_study(study_name="resumed", storage=open_storage(url))
    trials = _assert_study_consistent(exp, study, 2)
    for t in running:  # each trial killed while running was re-run under its number, or marked interrupted
        after = trials[t.number]
        rerun = after.state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert rerun or after.user_attrs.get("interrupted")
        print(f"killed trial #{t.number} ({t.user_attrs.get('ray_trial_id')}): "
              f"{'re-run, ' + after.state.name if rerun else 'FAIL (interrupted)'}")


@pytest.mark.slow
def test_ctrl_c_leaves_the_running_trial_to_resume(tune_experiment, tmp_path, capsys):
    """Ctrl-C (SIGINT to the driver) ends Tune gracefully with its state saved: the running trial is Tune's to
    re-run under --resume, so it stays RUNNING in the study (it was marked FAIL, and its re-run's result was then
    discarded), and the job exits 130 naming --resume (it exited 0)."""
    exp, log = tmp_path / "exp", tmp_path / "driver.log"
    args, driver, tree = _driver_in_a_trial(tune_experiment, exp, "ctrl-c", log, trials=1)
    try:
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=180)
    finally:
        _kill([driver.pid, *tree])
    out = log.read_text()
    assert driver.returncode == 130, out[-3000:]
    assert "--resume" in out.splitlines()[-1] and "unfinished" in out.splitlines()[-1], out[-3000:]
    url = resolve_storage("journal", exp)
    before = optuna.load_study(study_name="ctrl-c", storage=open_storage(url)).get_trials()
    assert not [t for t in before if t.state == TrialState.FAIL], [t.state for t in before]
    running = [t for t in before if t.state == TrialState.RUNNING]
    assert running, [t.state for t in before]

    assert kcpt_main(["tune", *args, "--resume"]) == 0
    capsys.readouterr()
    study = optuna.load_study(study_name="ctrl-c", storage=open_storage(url))
    (trial,) = _assert_study_consistent(exp, study, 1)
    assert trial.number == running[0].number and trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
