"""kcpt.raystart: ``--address`` / ``RAY_ADDRESS`` joins an existing Ray without sizing it (Ray refuses num_cpus
then); otherwise a local Ray gets exactly the ``num_cpus`` asked for; a tune job's local Ray releases the placement
group of a Train controller killed with its trial (its dashboard, found through ``RAY_API_SERVER_ADDRESS``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from kcpt.raystart import ray_address, start_ray


@pytest.fixture
def head():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_joins_address_or_ray_address_without_sizing(head, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address() is None and ray_address("x:1") == "x:1"
    assert start_ray(head.address, num_cpus=7) is True
    assert ray.cluster_resources()["CPU"] == 2  # the cluster's own size, not 7
    assert start_ray(head.address, num_cpus=7) is False  # already up: the caller does not own it
    ray.shutdown()
    monkeypatch.setenv("RAY_ADDRESS", head.address)  # what `ray job submit` sets
    assert start_ray(None, num_cpus=7) is True
    assert ray.cluster_resources()["CPU"] == 2
    # Tune's slow-callback warnings and "Resume experiment with: Tuner.restore(...)" reached kcpt's console: the
    # Ray libraries kcpt's console replaces print errors only there (their log files keep everything)
    import logging

    from kcpt.console import QUIET_RAY_LOGGERS

    assert {logging.getLogger(n).level for n in QUIET_RAY_LOGGERS} == {logging.ERROR}
    assert "ray.tune" in QUIET_RAY_LOGGERS and "ray.data" in QUIET_RAY_LOGGERS


def _owner_fit(marks: Path):
    """A Ray actor that runs a 2-worker TorchTrainer whose workers never finish, as a Tune trial runs one; each
    worker touches ``marks/rank-<r>`` once the run is under way (its placement group is registered by then)."""

    @ray.remote(num_cpus=1)
    class Owner:
        def fit(self) -> None:
            from ray.train import ScalingConfig
            from ray.train.torch import TorchTrainer

            def forever() -> None:
                import time

                import ray.train

                (marks / f"rank-{ray.train.get_context().get_world_rank()}").touch()
                time.sleep(600)

            TorchTrainer(forever, scaling_config=ScalingConfig(num_workers=2)).fit()

    return Owner.remote()


def _live_pgs() -> dict[str, int]:
    """Placement groups not removed: id → number of bundles."""
    return {pid: len(pg["bundles"]) for pid, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


def test_a_killed_train_controllers_placement_group_is_released(monkeypatch, tmp_path):
    """Local Ray: exactly ``num_cpus``; and when the owner of a Ray Train run dies (a Tune trial stopped by ASHA),
    the worker group's placement group is released — Train's cleaner reaches this Ray's dashboard, even with a stale
    ``ray start`` address in ``/tmp/ray/ray_current_cluster`` (this machine's state after a ``ray start`` test).
    Without that, the next trial's workers wait for CPUs forever (the README's tune job hung so)."""
    import time

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    current = Path("/tmp/ray/ray_current_cluster")
    saved = current.read_text() if current.is_file() else None
    current.parent.mkdir(parents=True, exist_ok=True)
    current.write_text("127.0.0.1:1")  # a `ray start` cluster that is gone
    try:
        assert start_ray(None, num_cpus=3) is True
        assert ray.cluster_resources()["CPU"] == 3
        owner = _owner_fit(tmp_path)
        fit = owner.fit.remote()
        deadline = time.time() + 120
        while len(list(tmp_path.glob("rank-*"))) < 2:  # both workers run the loop
            assert time.time() < deadline, ray.get(fit, timeout=1)
            time.sleep(0.5)
        (pg_id,) = [pid for pid, n in _live_pgs().items() if n == 2]  # the worker group's: 2 bundles
        ray.kill(owner)  # the controller, owned by it, dies with it
        deadline = time.time() + 60
        while pg_id in _live_pgs():
            assert time.time() < deadline, f"placement group {pg_id} still reserved 60 s after its controller died"
            time.sleep(0.5)
        deadline = time.time() + 30
        while ray.available_resources().get("CPU", 0) < 3:  # every CPU free again for the next trial
            assert time.time() < deadline, ray.available_resources()
            time.sleep(0.5)
    finally:
        ray.shutdown()
        if saved is None:
            current.unlink(missing_ok=True)
        else:
            current.write_text(saved)


def test_a_local_ray_that_cannot_start_is_one_line_that_says_what_to_check(monkeypatch, capsys, tmp_path):
    """Ray's startup failures are plain Exceptions (crash audit: under ``ulimit -f`` the node timed out and the job
    printed Ray's traceback): the job prints one line naming the failure, where Ray's logs are and what to check.
    (Ray's own failure is injected: making a real start fail takes a minute of timeouts.)"""
    from kcpt.cli import main

    if ray.is_initialized():
        ray.shutdown()

    def fails(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the Ray "
                        "processes failed to startup.\nmore lines")

    monkeypatch.setattr(ray, "init", fails)
    rc = main(["train", "--stages", "cpt", "--set", f"train.output_dir={tmp_path}", "--set",
               f"data.prepared_root={tmp_path}", "--run-name", "nostart"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "could not start a local Ray: The current node timed out during startup" in err[0]
    assert "check the free space of /tmp and /dev/shm and the file-size limit (ulimit -f)" in err[0]
