"""Every Ray cluster launcher YAML in cluster/ validates against the schema shipped with the installed ray."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
YAMLS = sorted(CLUSTER_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_there_are_aws_and_gcp_configs():
    assert {p.name for p in YAMLS} >= {"aws-gpu.yaml", "gcp-gpu.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_cluster_yaml_matches_ray_schema(path: Path, schema: dict):
    cfg = load(path)
    jsonschema.validate(cfg, schema)
    # operational rules the schema cannot see
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [n for n in types if n != cfg["head_node_type"]]
    assert gpu_types and all(types[n]["max_workers"] >= types[n]["min_workers"] for n in types)
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # dashboard / job API never exposed publicly
    assert any("pip install" in c and "kcpt" in c and "constraints.txt" in c for c in cfg["setup_commands"])
    sg = cfg["provider"].get("security_group", {})
    for perm in sg.get("IpPermissions", []):
        assert not (perm.get("FromPort", 0) <= 8265 <= perm.get("ToPort", -1)), "port 8265 must stay closed"


def test_schema_rejects_an_invalid_config(schema: dict):
    cfg = load(CLUSTER_DIR / "aws-gpu.yaml")
    bad = copy.deepcopy(cfg)
    bad["max_workers"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_p5"]["min_wrokers"] = 1  # typo: unknown key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(cfg)
    del bad["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
