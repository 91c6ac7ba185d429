"""kcpt.raystart: ``--address`` / ``RAY_ADDRESS`` joins an existing Ray without sizing it (Ray refuses num_cpus
then); otherwise a local Ray gets exactly the ``num_cpus`` asked for."""

from __future__ import annotations

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


def test_local_ray_gets_explicit_num_cpus_and_no_dashboard(monkeypatch):
    """A private local Ray starts without the dashboard's module processes (about 2.5 CPU-seconds per start, 4 s of
    a short run's wall time on 2 cores, for a dashboard nobody opens); ``include_dashboard=True`` still gets them."""
    import psutil

    def dashboard_modules() -> list[str]:
        return [p.name() for p in psutil.Process().children(recursive=True) if p.name().startswith("ray-dashboard-")]

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    try:
        assert start_ray(None, num_cpus=1) is True
        assert ray.cluster_resources()["CPU"] == 1
        assert dashboard_modules() == []
        ray.shutdown()
        assert start_ray(None, num_cpus=1, include_dashboard=True) is True  # the caller's choice wins
        assert "ray-dashboard-JobHead-0" in dashboard_modules()
    finally:
        ray.shutdown()
