"""`ray job submit` of jobs/tune_stage3.py and jobs/cpt.py to a real local Ray cluster (head started with
`ray start`): inside a submitted job RAY_ADDRESS is set, and every entry point joins that Ray instead of sizing
one (``num_cpus`` would be refused).

Reuses the session experiment's prerequisite checkpoints (same plan, output_dir and prepared_root: same config
hash), so the tune job only tunes stage 3. The cluster is stopped in a finally (`ray stop --force`).
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

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_ray_job_submit_tunes_stage3(tune_experiment, tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port, dash = free_port(), free_port()
    exp_dir = tmp_path / "job-exp"
    try:
        r = ray_cli("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-port",
                    str(dash), "--num-cpus", "4", "--include-dashboard", "true", "--disable-usage-stats", env=env)
        assert r.returncode == 0, r.stderr
        address = f"http://127.0.0.1:{dash}"
        runtime_env = {"excludes": [".git", "runs", "prepared", "experiments", "*.egg-info", ".pytest_cache"],
                       "env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}}
        sets = [a for o in tune_experiment.overrides if not o.startswith("tune.num_samples") for a in ("--set", o)]
        sub_id = f"kcpt-tune-{int(time.time())}"
        r = ray_cli("job", "submit", "--address", address, "--working-dir", ".", "--submission-id", sub_id,
                    "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--",
                    "python", "jobs/tune_stage3.py", "--num-samples", "2", "--study-name", "job-study",
                    "--experiment-dir", str(exp_dir), *sets, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(address)
        deadline = time.time() + 420
        status = client.get_job_status(sub_id)
        while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
            time.sleep(3)
            status = client.get_job_status(sub_id)
        logs = client.get_job_logs(sub_id)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert "reused" in logs  # prerequisites came from the session experiment (same config hash)
        df = pd.read_parquet(exp_dir / "trials.parquet")
        assert len(df) == 2 and set(df["status"]) <= {"COMPLETE", "PRUNED"}
        study = optuna.load_study(study_name="job-study", storage=f"sqlite:///{exp_dir / 'optuna.db'}")
        assert len(study.trials) == 2 and all("raw_gate" in t.constraints for t in study.trials)
        assert (exp_dir / "best_config.yaml").is_file() == bool(df["feasible"].any())
        assert (exp_dir / "best_trial.json").is_file()

        cpt_id = f"kcpt-cpt-{int(time.time())}"
        run_dir = tmp_path / "cpt-run"
        r = ray_cli("job", "submit", "--address", address, "--working-dir", ".", "--submission-id", cpt_id,
                    "--runtime-env-json", json.dumps(runtime_env), "--",
                    "python", "jobs/cpt.py", "--run-dir", str(run_dir), *sets, "--set", "plan.0.max_steps=6",
                    "--set", "plan.0.eval_every=3", env=env, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["stage_order"] == ["cpt"] and summary["stages"]["cpt"]["steps"] == 6
    finally:
        ray_cli("stop", "--force", env=env)
