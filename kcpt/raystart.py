"""One way for every entry point (train, tune, prepare --ray) to get a Ray.

Join the cluster named by ``address`` (``--address``), else by ``RAY_ADDRESS`` (set inside ``ray job submit``),
never sizing it (Ray refuses ``num_cpus`` when connecting); otherwise start a local Ray with an explicit
``num_cpus`` (a laptop or a test must not claim every core implicitly).
"""

from __future__ import annotations

import os
from typing import Any


def ray_address(address: str | None = None) -> str | None:
    """``address`` if given, else ``RAY_ADDRESS`` if set, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def start_ray(address: str | None, *, num_cpus: int, num_gpus: int | None = None, **init_kwargs: Any) -> bool:
    """Connect to :func:`ray_address` or start a local Ray with ``num_cpus`` (and ``num_gpus``).

    Returns True when this call initialised Ray (the caller calls ``ray.shutdown()`` when done), False when Ray
    was already initialised in this process (e.g. inside a Tune trial or a job that joined already).
    ``init_kwargs`` go to ``ray.init`` either way (e.g. ``log_to_driver``).
    """
    import ray

    if ray.is_initialized():
        return False
    joined = ray_address(address)
    if joined:
        ray.init(address=joined, **init_kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray: no ~/.ray/auth_token
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **init_kwargs)
    return True
