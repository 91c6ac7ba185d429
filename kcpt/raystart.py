"""One way for every entry point (train, tune, prepare --ray) to get a Ray.

Join the cluster named by ``address`` (``--address``), else by ``RAY_ADDRESS`` (set inside ``ray job submit``),
never sizing it (Ray refuses ``num_cpus`` when connecting); otherwise start a local Ray with an explicit
``num_cpus`` (a laptop or a test must not claim every core implicitly).

A local Ray for a tune job (``dashboard=True``, the default) has its dashboard, on 127.0.0.1 at a port chosen here,
and its processes find it through ``RAY_API_SERVER_ADDRESS`` (the job's runtime env). Ray Train under Tune needs
both: when a Tune trial that runs a TorchTrainer is stopped (ASHA), its Train controller dies with the trial, and
the worker group's placement group is released only by Train's detached ``PlacementGroupCleaner``, which asks the
State API — served by the dashboard — whether the controller is alive. Without the dashboard, or when the cleaner's
own address lookup finds another Ray on the machine (a stale ``ray start`` address in
``/tmp/ray/ray_current_cluster``, a second local instance), the placement group stays reserved until the job ends,
and the next trial waits for its workers forever (measured: the README's tune job hung at its 4th trial). A job
whose Train runs are owned by its driver (train, prepare) starts Ray without the dashboard (``dashboard=False``): a
controller that dies there fails the fit and ends the job, whose placement groups Ray removes with it; its nine
module processes would cost about 2.5 CPU-seconds per start.
"""

from __future__ import annotations

import os
import socket
from typing import Any

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
"""Where Ray's State API clients (Train's placement-group cleaner among them) find the dashboard; Ray reads it
before ``RAY_ADDRESS`` or ``/tmp/ray/ray_current_cluster``."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_address(address: str | None = None) -> str | None:
    """``address`` if given, else ``RAY_ADDRESS`` if set, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def start_ray(address: str | None, *, num_cpus: int, num_gpus: int | None = None, verbose: bool = False,
              dashboard: bool = True, **init_kwargs: Any) -> bool:
    """Connect to :func:`ray_address` or start a local Ray with ``num_cpus`` (and ``num_gpus``).

    Returns True when this call initialised Ray (the caller calls ``ray.shutdown()`` when done), False when Ray
    was already initialised in this process (e.g. inside a Tune trial or a job that joined already).
    ``verbose``: Ray's own output on this console (default: in Ray's log files, :func:`kcpt.console.ray_init_kwargs`);
    one kcpt line says which Ray was used and where its logs are. ``dashboard``: a local Ray's dashboard, named to
    its processes (see the module docstring; a joined cluster keeps its own). ``init_kwargs`` go to ``ray.init``
    either way.
    """
    import ray

    from kcpt.console import quiet_ray_loggers, ray_init_kwargs

    if ray.is_initialized():
        return False
    quiet_ray_loggers(verbose)
    init_kwargs = {**ray_init_kwargs(verbose), **init_kwargs}
    joined = ray_address(address)
    if joined:
        ctx = ray.init(address=joined, **init_kwargs)
        what = f"joined the Ray cluster at {joined}"
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray: no ~/.ray/auth_token
        if dashboard:  # at a known address, named to every process of this job (see the module docstring)
            port = _free_port()
            renv = dict(init_kwargs.pop("runtime_env", None) or {})
            renv["env_vars"] = {API_SERVER_ENV: f"http://127.0.0.1:{port}", **(renv.get("env_vars") or {})}
            init_kwargs = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
                           "runtime_env": renv, **init_kwargs}
        else:
            init_kwargs = {"include_dashboard": False, **init_kwargs}
        # address="local": always a new private instance, never a `ray start` cluster found on this machine
        try:
            ctx = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **init_kwargs)
        except OSError:
            raise  # a path or a port: one line already, naming it
        except Exception as e:  # noqa: BLE001 - Ray's startup failures are plain Exceptions (a node timed out, ...)
            from kcpt.errors import KcptError

            first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
            raise KcptError(f"could not start a local Ray: {first}. Its processes' logs are under "
                            f"{os.environ.get('RAY_TMPDIR', '/tmp/ray')}/session_latest/logs; check the free space "
                            "of /tmp and /dev/shm and the file-size limit (ulimit -f), or join a running cluster "
                            "with --address") from e
        what = f"started a local Ray ({num_cpus} CPUs)"
    session = (getattr(ctx, "address_info", None) or {}).get("session_dir")
    print(f"ray: {what}; Ray's logs: {session}/logs" if session else f"ray: {what}", flush=True)
    return True


def on_this_node() -> dict[str, Any]:
    """Ray actor options that keep an actor on this process's node: a driver-side helper (the console queue, the
    error box) must outlive the worker nodes, which a cluster may lose (a preempted node takes its actors along)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                  soft=False)}
