"""Temporary sibling directories that a killed process leaves behind are recognisable and removed later.

Everything kcpt writes atomically (prepared datasets, the demo corpus, cached tokenizers) is built in a hidden
sibling ``.<name>.tmp-<host>-<pid>-<random>`` of its target and renamed into place. A kill leaves that
sibling behind; :func:`remove_stale_siblings` (called before the next build) deletes the ones whose process is
gone on this host. Directories of live processes, and of other hosts sharing the filesystem, are left alone.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

KINDS = ("tmp", "old")


def _tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-"


def temp_sibling(out: Path, kind: str = "tmp") -> Path:
    """Create and return ``.<out.name>.<kind>-<host>-<pid>-<random>`` beside ``out``."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{_tag()}", dir=out.parent))


def sibling_name(out: Path, kind: str, suffix: str) -> Path:
    """``.<out.name>.<kind>-<host>-<pid>-<suffix>`` beside ``out`` (not created)."""
    return out.with_name(f".{out.name}.{kind}-{_tag()}{suffix}")


def is_stale(name: str, prefix: str) -> bool:
    """True for ``<prefix><host>-<pid>-<rand>`` when that host is this one and the process is gone."""
    try:
        host, pid, _ = name[len(prefix):].rsplit("-", 2)
        pid_n = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def remove_stale_siblings(out: Path) -> list[Path]:
    """Delete the temporary siblings of ``out`` left by dead processes on this host; returns them."""
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        for kind in KINDS:
            prefix = f".{out.name}.{kind}-"
            if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink() and is_stale(p.name, prefix):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed
