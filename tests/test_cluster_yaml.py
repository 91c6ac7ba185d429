"""The Ray cluster-launcher YAMLs in cluster/: schema-valid for the installed ray, cloud rules the schema cannot see,
and their setup commands EXECUTED here the way the launcher runs them on a node (tests/cluster_setup.py).

The execution test stages a fake node home (the repo synced per file_mounts/rsync_exclude/rsync_filter, Ubuntu's
~/.bashrc), then runs Ray's own merged head and worker command lists with ``bash -euo pipefail`` against this
machine's package index. To stay fast and leave the machine untouched, the venv the setup script creates gets
``--system-site-packages`` (KCPT_VENV_FLAGS), so the pins already installed here satisfy ``-c constraints.txt``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
from cluster_setup import in_node_shell, load, node_commands, node_env, run_node_commands, stage_home

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
YAMLS = sorted(CLUSTER_DIR.glob("*.yaml"))
SDK = {"aws": "boto3", "gcp": "googleapiclient"}  # what each provider's autoscaler imports on the head


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


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
    sg = cfg["provider"].get("security_group", {})
    for perm in sg.get("IpPermissions", []):
        assert not (perm.get("FromPort", 0) <= 8265 <= perm.get("ToPort", -1)), "port 8265 must stay closed"
    if cfg["provider"]["type"] == "aws":
        # a group Ray creates always gets SSH from 0.0.0.0/0 besides the listed rules: every node type names its
        # own pre-made group instead, so Ray creates none
        assert "security_group" not in cfg["provider"]
        assert all(t["node_config"].get("SecurityGroupIds") for t in types.values())


def test_gpu_nodes_boot_an_image_with_nvidia_drivers():
    aws = load(CLUSTER_DIR / "aws-gpu.yaml")
    for name, nt in aws["available_node_types"].items():
        image = nt["node_config"]["ImageId"]
        # a Deep Learning AMI via AWS's public SSM parameter (users may pin the ami-… id it names, README §0)
        assert image.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-"), \
            (name, image)
        assert "IamInstanceProfile" in nt["node_config"], f"{name}: no instance profile → no bucket access"
    gcp = load(CLUSTER_DIR / "gcp-gpu.yaml")
    for name, nt in gcp["available_node_types"].items():
        disk = nt["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
        assert disk.startswith("projects/deeplearning-platform-release/"), (name, disk)
        if name == gcp["head_node_type"]:
            continue
        meta = {i["key"]: i["value"] for i in nt["node_config"]["metadata"]["items"]}
        assert meta.get("install-nvidia-driver") == "True", name
        # GCP's API takes `scheduling` as an object (ray-project/ray#46248); GPU VMs cannot live-migrate
        assert nt["node_config"]["scheduling"] == {"onHostMaintenance": "TERMINATE"}, name
        assert nt["node_config"]["serviceAccounts"][0]["scopes"], f"{name}: no service account → no bucket access"


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_head_installs_the_cloud_sdk(path: Path):
    """What Ray will run on the head (its own merge of defaults + setup + head_setup) installs the provider SDK;
    `head_setup_commands: []` would drop Ray's default and the autoscaler could not launch workers."""
    cfg = load(path)
    cmds = node_commands(cfg)
    head_only = cmds["head"][len(cmds["worker"]):]
    pkg = {"aws": "boto3", "gcp": "google-api-python-client"}[cfg["provider"]["type"]]
    assert any("pip install" in c and pkg in c for c in head_only), head_only


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


# --------------------------------------------------------------------------- executing the setup commands


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_setup_commands_install_kcpt_on_a_fresh_node(tmp_path: Path):
    """Every YAML's head setup on one fresh node, one after the other: the first YAML's full setup, then each other
    YAML's, which re-runs setup on a provisioned node as a second `ray up` does and must still succeed. A worker
    runs the head's list without its provider SDK line (asserted), so the head runs cover the worker's commands."""
    cfgs = [load(p) for p in YAMLS]
    home = tmp_path / "home"
    stage_home(home, REPO, cfgs[0])
    assert (home / "kcpt" / "pyproject.toml").is_file() and not (home / "kcpt" / ".git").exists()
    env = node_env(home, KCPT_VENV_FLAGS="--system-site-packages", KCPT_APT="0")
    first = node_commands(cfgs[0])
    for path, cfg in zip(YAMLS, cfgs, strict=True):
        cmds = node_commands(cfg)
        assert cmds["worker"] == first["worker"] and cmds["head"][:-1] == first["head"][:-1], path.name
        assert cmds["head"][:len(cmds["worker"])] == cmds["worker"], path.name
        # on the node set up by the YAML before: a second `ray up` re-runs setup and must still succeed
        ran = run_node_commands(cmds["head"], home, env)
        assert [r.returncode for r in ran] == [0] * len(cmds["head"]), \
            f"{path.name} head: {ran[-1].command}\n{ran[-1].output}"
        # the provider SDK the head's autoscaler imports
        sdk = in_node_shell(f"python -c 'import {SDK[cfg['provider']['type']]}'", home, env)
        assert sdk.returncode == 0, (path.name, sdk.stderr)

    venv = home / "kcpt-venv"
    bashrc = (home / ".bashrc").read_text()
    assert bashrc.splitlines()[0].startswith(f'export PATH="{venv}/bin:$PATH"'), bashrc  # before Ubuntu's return
    assert bashrc.count("kcpt venv") == 1, "re-running setup must not stack PATH lines"

    # what `ray start`, the job drivers and `kcpt report` see on the node: the venv, and kcpt from ~/kcpt
    probe = in_node_shell(
        "command -v python; python -c 'import sys, kcpt; print(sys.prefix); print(kcpt.__file__)'; kcpt --help",
        home, env)
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert lines[0] == str(venv / "bin" / "python")
    assert lines[1] == str(venv)
    assert Path(lines[2]).is_relative_to(home / "kcpt" / "kcpt"), lines[2]


def old_pythons() -> list[str]:
    """Real interpreters older than 3.11 on this machine (pyenv keeps some next to this one), by absolute path."""
    found = []
    for exe in sorted(Path(sys.base_prefix).parent.glob("3.*/bin/python3")):
        p = subprocess.run([str(exe), "-c", "import sys; print(sys.version_info >= (3, 11))"], capture_output=True,
                           text=True)
        if p.returncode == 0 and p.stdout.strip() == "False":
            found.append(str(exe))
    return found


def test_setup_script_without_python_311_says_what_to_install(tmp_path: Path):
    """Off a cloud VM, no Python >= 3.11 (only older real interpreters, or none) → exit 2 naming what to install;
    apt is never tried."""
    cfg = load(CLUSTER_DIR / "aws-gpu.yaml")
    home = tmp_path / "home"
    stage_home(home, REPO, cfg)
    dmi = tmp_path / "dmi"
    dmi.mkdir()
    (dmi / "sys_vendor").write_text("QEMU\n")  # not Amazon EC2 / Google: not a cloud VM
    env = node_env(home, KCPT_PYTHON=" ".join([*old_pythons(), "no-such-python"]), KCPT_DMI_DIR=str(dmi))
    p = subprocess.run(["bash", str(home / "kcpt" / "cluster" / "setup-node.sh")], env=env, cwd=home,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no Python >= 3.11" in p.stderr and "python3.11-venv" in p.stderr and "apt-get update" not in p.stderr
    assert not (home / "kcpt-venv").exists()


def test_setup_script_outside_a_synced_repo_fails_clearly(tmp_path: Path):
    env = node_env(tmp_path, KCPT_REPO=str(tmp_path / "missing"))
    p = subprocess.run(["bash", str(CLUSTER_DIR / "setup-node.sh")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "run `ray up` from the repo root" in p.stderr, p.stderr
