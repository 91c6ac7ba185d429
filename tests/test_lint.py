"""The code base stays `ruff` clean (rules in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path


def test_ruff_clean():
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "ruff", "check", str(root)], capture_output=True, text=True,
                         cwd=root, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
