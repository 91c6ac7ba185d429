"""Every entry point under `ray job submit` against a real local Ray cluster (head started with `ray start`):
``jobs/tune_stage3.py``, ``jobs/cpt.py``, ``jobs/train_stages.py`` and ``kcpt prepare … --ray``. Inside a submitted
job RAY_ADDRESS is set, and every entry point joins that Ray (kcpt.raystart) instead of sizing one (``num_cpus``
would be refused): each job's log shows it connected to the existing cluster.

One head for the module (its `ray start --block` terminated in a finally). The tune job reuses the session experiment's
prerequisite checkpoints (same plan, output_dir and prepared_root: same config hash), so it only tunes stage 3;
the training jobs run tiny plans (a few steps per stage, one worker). ``jobs/train_stages.py`` (the whole plan in
one Ray Train run) is submitted once, by the walkthrough test, with every root and input in a bucket.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
JOINED = "ray: joined the Ray cluster at"  # kcpt's line (kcpt.raystart); a local start says "started a local Ray"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A `ray start --head --block` cluster (4 CPUs); yields a function that submits a job and returns (status,
    logs). The head is stopped by terminating that `ray start` (it stops the processes it started), not by
    `ray stop`, which would stop every Ray on the machine."""
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient

    if ray.is_initialized():
        ray.shutdown()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port, dash = free_port(), free_port()
    runtime_env = {"excludes": [".git", "runs", "prepared", "experiments", "*.egg-info", ".pytest_cache"],
                   "env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM, `ray start --block` stops its processes at once instead
    # of draining the node for up to 30 s first (a Kubernetes pod's graceful shutdown; nothing to drain here)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-port", str(dash),
                             "--num-cpus", "4", "--include-dashboard", "true", "--disable-usage-stats"],
                            env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, cwd=REPO, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while True:  # the dashboard answers once the head is up
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                client = JobSubmissionClient(address)
                break
            except (ConnectionError, RuntimeError):
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)

        def submit(name: str, *entrypoint: str, timeout: int = 420, env_vars: dict | None = None
                   ) -> tuple[JobStatus, str]:
            sub_id = f"kcpt-{name}-{int(time.time() * 1000)}"
            renv = {**runtime_env, "env_vars": {**runtime_env["env_vars"], **(env_vars or {})}}
            for _ in range(60):  # the head's job agent may still be starting: "No available agent"
                r = ray_cli("job", "submit", "--address", address, "--working-dir", ".", "--submission-id", sub_id,
                            "--runtime-env-json", json.dumps(renv), "--no-wait", "--", *entrypoint, env=env)
                if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr:
                    break
                time.sleep(1)
            assert r.returncode == 0, r.stdout + r.stderr
            deadline = time.time() + timeout
            status = client.get_job_status(sub_id)
            while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
                time.sleep(0.5)
                status = client.get_job_status(sub_id)
            return status, client.get_job_logs(sub_id)

        yield submit
    finally:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_ray_job_submit_tunes_stage3(head, tune_experiment, tmp_path):
    from conftest import assert_console_agrees_with_study
    from ray.job_submission import JobStatus

    exp_dir = tmp_path / "job-exp"
    # the session experiment's settings (its prerequisites are reused), trials of 8 steps: the job, not the search
    sets = [a for o in (*tune_experiment.overrides, "tune.stage_overrides.max_steps=8",
                                    "tune.stage_overrides.stop.consecutive=2")
            if not o.startswith("tune.num_samples") for a in ("--set", o)]
    status, logs = head("tune", "python", "jobs/tune_stage3.py", "--num-samples", "1", "--study-name", "job-study",
                        "--experiment-dir", str(exp_dir), *sets)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "reused" in logs  # prerequisites came from the session experiment (same config hash)
    assert JOINED in logs
    df = pd.read_parquet(exp_dir / "trials.parquet")
    assert len(df) == 1 and set(df["status"]) <= {"COMPLETE", "PRUNED"}
    study = optuna.load_study(study_name="job-study", storage=f"sqlite:///{exp_dir / 'optuna.db'}")
    assert len(study.trials) == 1 and all("raw_gate" in t.constraints for t in study.trials)
    assert_console_agrees_with_study(logs, study)  # the submitted job's console lines say what the study holds
    assert (exp_dir / "best_config.yaml").is_file() == bool(df["feasible"].any())
    assert (exp_dir / "best_trial.json").is_file()


TINY = ["train.num_workers=1", "logging.progress=false", "logging.tensorboard=false", "train.max_eval_rows=32",
        *(f"plan.{i}.{k}" for i in range(4) for k in ("max_steps=4", "eval_every=2"))]


def test_ray_job_submit_train_and_prepare_entry_points(head, tmp_path):
    from ray.job_submission import JobStatus

    from kcpt.data.demo import konlpy_corpus_dir
    from kcpt.data.shards import read_manifest

    # kcpt prepare … --ray: the Ray Data pipeline on the cluster's Ray
    corpus = tmp_path / "corpus.jsonl"
    text = (konlpy_corpus_dir() / "kolaw" / "constitution.txt").read_text(encoding="utf-8")
    corpus.write_text("".join(json.dumps({"text": text[i:i + 400]}, ensure_ascii=False) + "\n"
                              for i in range(0, 8000, 400)), encoding="utf-8")
    out = tmp_path / "prepared-raw"
    status, logs = head("prepare", "kcpt", "prepare", "raw", "--input", str(corpus), "--out", str(out), "--ray",
                        "--seq-len", "64", "--no-progress")
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert JOINED in logs and "pack efficiency" in logs
    assert read_manifest(out)["pipeline"] == "ray_data" and read_manifest(out)["rows"] > 0

    sets = [a for o in (*TINY, f"data.prepared_root={tmp_path / 'prepared'}", f"train.output_dir={tmp_path / 'runs'}")
            for a in ("--set", o)]
    # jobs/cpt.py: the CPT stage only
    cpt_dir = tmp_path / "runs" / "cpt"
    status, logs = head("cpt", "python", "jobs/cpt.py", "--run-dir", str(cpt_dir), "--verbose", *sets)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert JOINED in logs
    assert "RayTrainWorker pid" in logs  # --verbose: Ray's own worker output is back (test_console: hidden without)
    summary = json.loads((cpt_dir / "summary.json").read_text())
    assert summary["stage_order"] == ["cpt"] and summary["stages"]["cpt"]["steps"] == 4
    # the same run again without --resume: refused in one line, nothing replaced
    status, logs = head("cpt-again", "python", "jobs/cpt.py", "--run-dir", str(cpt_dir), *sets)
    assert status == JobStatus.FAILED and "--resume" in logs and "--overwrite" in logs
    assert json.loads((cpt_dir / "summary.json").read_text()) == summary
    # jobs/train_stages.py (the whole plan in one Ray Train run): test_walkthrough_inputs_and_outputs_in_a_bucket


def test_walkthrough_inputs_and_outputs_in_a_bucket(head, s3_prefix, tmp_path):
    """cluster/README.md §3-4 on this machine: inputs uploaded to the bucket, `ray job submit` of
    jobs/train_stages.py (the whole plan in one Ray Train run) with every root and input on s3:// and the
    credentials/endpoint (and an HF_TOKEN) passed in the job's runtime env — the head was started without them —
    then `kcpt report s3://…` from here."""
    from ray.job_submission import JobStatus

    from kcpt.data.demo import build_demo_corpus
    from kcpt.storage import Store

    bucket = Store(s3_prefix)
    splits = build_demo_corpus()
    for split, path in splits.items():
        bucket.upload_file(path, f"inputs/{split}{path.suffix}")
    aws = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    inputs = {"raw_train": ["raw_train"], "raw_val": ["raw_val"], "qa_train": ["qa_train"],
              "example_train": ["example_train"], "exam_val": ["qa_val", "example_val"]}
    sets = [*TINY, f"train.output_dir={s3_prefix}/runs", f"data.prepared_root={s3_prefix}/prepared",
            *(f"data.datasets.{ds}.inputs=[{','.join(f'{s3_prefix}/inputs/{x}.jsonl' for x in xs)}]"
              for ds, xs in inputs.items())]
    status, logs = head("walkthrough", "python", "jobs/train_stages.py", "--run-name", "walk",
                        *(a for o in sets for a in ("--set", o)), env_vars={**aws, "HF_TOKEN": "hf_dummy"})
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert JOINED in logs and f"{s3_prefix}/runs/walk" in logs
    run = Store(f"{s3_prefix}/runs/walk")
    summary = json.loads(run.read_text("summary.json"))
    assert summary["stage_order"] == ["cpt", "stage1", "stage2", "stage3"]
    assert all(summary["stages"][s]["steps"] >= 1 for s in summary["stage_order"])
    prepared = json.loads(Store(f"{s3_prefix}/prepared").read_text(
        next(n for n in Store(f"{s3_prefix}/prepared").listdir() if n.startswith("raw_train-")) + "/manifest.json"))
    assert prepared["inputs"][0]["path"].endswith("raw_train.jsonl") and prepared["rows"] > 0
    out = subprocess.run([sys.executable, "-m", "kcpt.cli", "report", f"{s3_prefix}/runs/walk"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "stage3" in out.stdout and f"{s3_prefix}/runs/walk" in out.stdout
