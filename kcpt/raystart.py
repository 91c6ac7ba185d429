"""One way for every entry point (train, tune, prepare --ray) to get a Ray.

Join the cluster named by ``address`` (``--address``), else by ``RAY_ADDRESS`` (set inside ``ray job submit``),
never sizing it (Ray refuses ``num_cpus`` when connecting); otherwise start a local Ray with an explicit
``num_cpus`` (a laptop or a test must not claim every core implicitly) and without Ray's dashboard (its module
processes cost about 2.5 CPU-seconds per start — 4 s of a short run on 2 cores — for a Ray that lives as long as
one job; for the dashboard, start Ray yourself with ``ray start --head`` and pass ``--address``).
"""

from __future__ import annotations

import os
from typing import Any


def ray_address(address: str | None = None) -> str | None:
    """``address`` if given, else ``RAY_ADDRESS`` if set, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def start_ray(address: str | None, *, num_cpus: int, num_gpus: int | None = None, verbose: bool = False,
              **init_kwargs: Any) -> bool:
    """Connect to :func:`ray_address` or start a local Ray with ``num_cpus`` (and ``num_gpus``).

    Returns True when this call initialised Ray (the caller calls ``ray.shutdown()`` when done), False when Ray
    was already initialised in this process (e.g. inside a Tune trial or a job that joined already).
    ``verbose``: Ray's own output on this console (default: in Ray's log files, :func:`kcpt.console.ray_init_kwargs`);
    one kcpt line says which Ray was used and where its logs are. ``init_kwargs`` go to ``ray.init`` either way.
    """
    import ray

    from kcpt.console import ray_init_kwargs

    if ray.is_initialized():
        return False
    init_kwargs = {**ray_init_kwargs(verbose), **init_kwargs}
    joined = ray_address(address)
    if joined:
        ctx = ray.init(address=joined, **init_kwargs)
        what = f"joined the Ray cluster at {joined}"
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray: no ~/.ray/auth_token
        # address="local": always a new private instance, never a `ray start` cluster found on this machine
        ctx = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                       **{"include_dashboard": False, **init_kwargs})
        what = f"started a local Ray ({num_cpus} CPUs)"
    session = (getattr(ctx, "address_info", None) or {}).get("session_dir")
    print(f"ray: {what}; Ray's logs: {session}/logs" if session else f"ray: {what}", flush=True)
    return True
