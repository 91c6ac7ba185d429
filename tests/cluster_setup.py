"""Run a Ray cluster-launcher YAML's setup commands on this machine, the way the launcher runs them on a node.

Contract: :func:`node_commands` returns the command lists Ray itself derives from a YAML (``prepare_config``:
defaults merged, ``setup_commands`` prepended to the head / worker lists); :func:`stage_home` builds a fake node
home (the repo synced per ``file_mounts`` + ``rsync_exclude`` / ``rsync_filter``, an Ubuntu-like ``~/.bashrc``);
:func:`run_node_commands` runs each command like Ray does (``source ~/.bashrc; (cmd)``), here under
``bash -euo pipefail``, with HOME set to the fake home, and stops at the first failure.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config

# What Ubuntu's /etc/skel/.bashrc does first: non-interactive shells return before reaching the rest.
UBUNTU_BASHRC = "# ~/.bashrc (Ubuntu skeleton)\ncase $- in\n    *i*) ;;\n      *) return;;\nesac\nalias ll='ls -alF'\n"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def node_commands(cfg: dict) -> dict[str, list[str]]:
    """{"head": [...], "worker": [...]}: initialization + setup commands as Ray runs them on each node kind."""
    merged = prepare_config(cfg)
    init = list(merged.get("initialization_commands") or [])
    return {"head": init + list(merged["head_setup_commands"]), "worker": init + list(merged["worker_setup_commands"])}


def _excluded(rel: Path, patterns: list[str]) -> bool:
    """rsync ``--exclude`` semantics for the patterns used here: ``**/name`` or ``name`` match any path component."""
    for pat in patterns:
        name = pat.removeprefix("**/").rstrip("/")
        if any(fnmatch.fnmatch(part, name) for part in rel.parts):
            return True
    return False


def synced_files(repo: Path, cfg: dict) -> list[Path]:
    """Repo-relative files `ray up` would sync: ``.gitignore`` honoured when ``rsync_filter`` names it (git decides),
    then ``rsync_exclude`` applied."""
    if ".gitignore" in (cfg.get("rsync_filter") or []) and (repo / ".git").exists():
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard", "-z"],
                             check=True, capture_output=True).stdout.decode()
        files = [Path(p) for p in out.split("\0") if p]
    else:
        files = [p.relative_to(repo) for p in repo.rglob("*") if p.is_file()]
    excludes = list(cfg.get("rsync_exclude") or [])
    return [f for f in files if (repo / f).is_file() and not _excluded(f, excludes)]


def stage_home(home: Path, repo: Path, cfg: dict) -> None:
    """Make ``home`` look like a fresh node after `ray up`'s file sync: each ``file_mounts`` target under ~ filled
    from the repo (only ``.`` sources are supported), plus Ubuntu's ``~/.bashrc``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / ".bashrc").write_text(UBUNTU_BASHRC)
    for remote, local in (cfg.get("file_mounts") or {}).items():
        assert remote.startswith("~/") and local == ".", f"unsupported file mount {remote}: {local}"
        dest = home / remote[2:]
        for rel in synced_files(repo, cfg):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, dest / rel)


@dataclass
class Ran:
    command: str
    returncode: int
    output: str


def node_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment with HOME moved to the fake home; PYTHONPATH dropped so imports come from the
    node's install; the real pip cache kept (wheels only, so the second run is fast)."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    env.update(HOME=str(home), PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def run_node_commands(commands: list[str], home: Path, env: dict[str, str], timeout: float = 900) -> list[Ran]:
    """Run each command as Ray does (``source ~/.bashrc; (cmd)``) under ``bash -euo pipefail``, cwd ~; stop at the
    first non-zero exit. Returns what ran."""
    ran: list[Ran] = []
    for cmd in commands:
        p = subprocess.run(["bash", "-euo", "pipefail", "-c", f"source ~/.bashrc; ({cmd})"], cwd=home, env=env,
                           capture_output=True, text=True, timeout=timeout)
        ran.append(Ran(cmd, p.returncode, p.stdout + p.stderr))
        if p.returncode:
            break
    return ran


def in_node_shell(script: str, home: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``script`` in a node shell after ``source ~/.bashrc`` (what `ray start` and the jobs see)."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", f"source ~/.bashrc; {script}"], cwd="/", env=env,
                          capture_output=True, text=True, timeout=120)
