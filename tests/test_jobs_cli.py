"""The job scripts fail fast on bad configuration with one line naming the file / key and exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("job", "args", "expect"), [
    ("cpt.py", ["--config", "missing.yaml"], "missing.yaml: cannot read config"),
    ("train_stages.py", ["--set", "train.num_workrs=3"], "train.num_workrs: unknown key"),
    ("tune_stage3.py", ["--set", "plan.3.sources={nope: 1.0}"], "unknown dataset 'nope'"),
])
def test_job_reports_config_errors_in_one_line(job: str, args: list[str], expect: str):
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / job), *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 2, res.stderr
    assert expect in res.stderr and "Traceback" not in res.stderr
