"""Shared fixtures. Ray tests use a real local Ray with explicit num_cpus and shut it down."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train V2 fixed costs that a test pays on every fit() (and every tune trial's fit()), measured on 2 cores:
# - the controller polls the workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and a worker's
#   ray.train.report() blocks until the controller took the previous report (Ray's result queue holds one), so
#   short test stages that report an eval every second or two waited up to 2 s per report, and every fit() waited
#   up to 2 s more to be seen finished;
# - the preemption watcher is one more actor process per fit() (spot-instance drain notices: none here).
# Both are Ray settings, propagated by Ray Train from the driver's environment to its controller and workers;
# subprocesses started by tests (jobs, `ray start` heads, driver scripts) inherit them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


# ---------------------------------------------------------------------------- running the suite on two processes
# The suite runs on 2 pytest-xdist workers (pyproject: -n 2 --dist loadgroup). Ray tests, jobs and clusters never run
# two at a time: processes that look up "the" local Ray (/tmp/ray/ray_current_cluster; Train's PlacementGroupCleaner
# once found a stale one and left the CPUs reserved) could reach the other test's cluster, and the tests size their
# Rays to the machine's 2 cores. They form ONE group, run first and in order on one worker (as in a plain run); the
# other modules (in-process training, data, config, storage against that worker's own S3 server) run beside it on the
# other worker, a module at a time, in the part of the cores the Ray tests leave idle (start-up waits, polls: a plain
# run kept the 2 cores 70 % busy). `pytest -n 0` runs everything in one process, as before.
MACHINE_GROUP = "ray-and-subprocess-jobs"
MACHINE_MODULES = frozenset({
    "test_cluster_s3", "test_job_submit", "test_notebook", "test_ray_pipeline", "test_ray_prepare_scale",
    "test_ray_stream", "test_raystart", "test_train_ray", "test_tune_cluster", "test_tune_more_trials",
    "test_tune_searcher", "test_tune_stage3",
})
"""Modules whose tests start Ray (in this process or in a job or driver subprocess) or read the session's tune
experiment (made once, in the worker that runs this group). A test elsewhere that does is marked ``machine``."""
LAST_MACHINE_MODULES = ("test_train_ray", "test_benches", "test_cluster_s3")
"""Run last in the group, in this order: 2-worker runs that keep both cores busy (the demo plan on two nodes took
195-233 s alone and 328 s beside the other worker's modules); the group's job, tune-driver and Ray Data tests, which
wait on start-ups and polls, go first, beside the other worker."""


@pytest.hookimpl(tryfirst=True)  # before xdist's worker plugin reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Under xdist ``--dist loadgroup``: the Ray modules in one group, first; every other module a group of its own
    (its module fixtures made once)."""
    def on_the_machine(item: pytest.Item) -> bool:
        return item.module.__name__.rpartition(".")[2] in MACHINE_MODULES or item.get_closest_marker("machine")

    def late(item: pytest.Item) -> int:  # the CPU-bound end-to-end modules after the other worker is done
        return LAST_MACHINE_MODULES.index(m) + 1 if (m := item.module.__name__.rpartition(".")[2]) in \
            LAST_MACHINE_MODULES else 0

    machine = sorted((i for i in items if on_the_machine(i)), key=late)  # stable: in order within a module
    rest = [i for i in items if not on_the_machine(i)]
    for item in machine:
        item.add_marker(pytest.mark.xdist_group(MACHINE_GROUP))
    for item in rest:
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items[:] = [*machine, *rest]


@pytest.fixture(scope="session", autouse=True)
def node_scratch(tmp_path_factory):
    """``KCPT_SCRATCH`` (kcpt's node-local mirrors and downloads, :func:`kcpt.storage.scratch_root`) in this
    session's temp dir, for every process the tests start (Ray nodes, job heads inherit it), instead of the
    default ``<tmp>/kcpt-scratch-<uid>`` that would outlive the session. A test may point it elsewhere."""
    old = os.environ.get("KCPT_SCRATCH")
    os.environ["KCPT_SCRATCH"] = str(tmp_path_factory.mktemp("kcpt-scratch"))
    try:
        yield Path(os.environ["KCPT_SCRATCH"])
    finally:
        if old is None:
            os.environ.pop("KCPT_SCRATCH", None)
        else:
            os.environ["KCPT_SCRATCH"] = old


def checkpoint_copies(scratch: Path) -> list[Path]:
    """Checkpoint directories (a manifest inside a ``checkpoints`` directory) anywhere under a node scratch."""
    return [p.parent for p in Path(scratch).rglob("manifest.json") if "checkpoints" in p.parent.parent.name]


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
    "eval.exam_max_new_tokens=16",  # exam accuracy at every eval: decoding to the longest answer is the cost
]


@pytest.fixture(scope="session")
def tune_experiment(tmp_path_factory):
    """A finished stage-3 tune experiment (3 trials, micro-batch 4 or 8 searched) made by
    :func:`kcpt.tune.launch.tune_stage3`."""
    from types import SimpleNamespace

    from kcpt.config import load_config
    from kcpt.tune.launch import tune_stage3

    root = tmp_path_factory.mktemp("tune")
    overrides = [*TUNE_TEST_OVERRIDES, f"train.output_dir={root / 'runs'}", f"data.prepared_root={root / 'prepared'}",
                 "tune.num_samples=3", "tune.space.micro_batch_sizes=[4,8]"]
    cfg = load_config(None, overrides)
    console = io.StringIO()
    with contextlib.redirect_stdout(console):  # what the job prints (its console is made on the driver, here)
        result = tune_stage3(cfg, experiment_dir=root / "exp", verbose=0)
    print(console.getvalue())
    return SimpleNamespace(root=root, overrides=overrides, result=result, exp_dir=result.experiment_dir, cfg=cfg,
                           console=console.getvalue())


def assert_console_agrees_with_study(console: str, study) -> None:
    """The tune job's console (:class:`kcpt.tune.progress.TuneConsole`) has one line per finished trial of
    ``study``, and its verdict is the study's: "pruned" exactly for the trials told PRUNED (a trial the scheduler
    stopped on the eval that ends its stage is COMPLETE in both); the last line's tally counts the PRUNED trials."""
    import re

    import optuna

    finished = {}
    for ln in console.splitlines():
        hit = re.search(r"\[tune\] trial (\S+) (pruned|feasible|infeasible|failed)\b", ln)
        if hit:
            finished[hit[1]] = (hit[2], ln)
    states = {t.user_attrs["ray_trial_id"]: t.state for t in study.get_trials()}
    assert finished.keys() == states.keys(), console
    for tid, (verdict, line) in finished.items():
        assert (verdict == "pruned") == (states[tid] == optuna.trial.TrialState.PRUNED), (line, states[tid])
    n = len(states)
    n_pruned = sum(s == optuna.trial.TrialState.PRUNED for s in states.values())
    assert f"{n}/{n} done, 0 running, {n_pruned} pruned, 0 failed" in list(finished.values())[-1][1]


def stage3_study(exp_dir):
    """An empty minimising Optuna study ``s`` in SQLite under ``exp_dir``, which is made an experiment directory
    :func:`kcpt.tune.export.export_results` reads (``config.yaml`` = the demo config, ``experiment.json``).
    Returns the study and the Optuna distributions of the demo space's mixture fractions and LR (for ``study.ask``)."""
    import json

    import optuna

    from kcpt.config import dump_config, load_config

    cfg = load_config(None, [])
    storage = f"sqlite:///{exp_dir / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="minimize")
    dump_config(cfg, exp_dir / "config.yaml")
    (exp_dir / "experiment.json").write_text(json.dumps({"study_name": "s", "storage": storage, "stage": "stage3"}))
    ranges = {name: getattr(cfg.tune.space, name) for name in ("exam_fraction", "qa_fraction", "lr")}
    return study, {name: optuna.distributions.FloatDistribution(r.low, r.high, log=r.log)
                   for name, r in ranges.items()}


# --------------------------------------------------------------------------- S3 (moto's server on 127.0.0.1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API (moto's server mode) on 127.0.0.1, with bucket ``kcpt-test``. The endpoint and dummy
    credentials go into ``os.environ`` (``AWS_ENDPOINT_URL`` …) for the whole session, so Ray processes started
    afterwards (local clusters, job heads) reach it the standard way. Yields ``s3://kcpt-test``."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    exe = shutil.which("moto_server")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    cmd = [exe, "-H", "127.0.0.1", "-p", str(port)] if exe else \
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="kcpt-test")
    try:
        yield "s3://kcpt-test"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_prefix(s3_server, request):
    """A fresh ``s3://kcpt-test/<test name>-<n>`` prefix for one test."""
    import uuid

    return f"{s3_server}/{request.node.name.replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:6]}"
