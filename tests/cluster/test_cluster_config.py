"""cluster.yaml passes Ray's own validation (what `ray up` applies) and says what vlmlab needs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _validated(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # fills Ray's provider defaults
    validate_config(prepared)  # Ray's JSON schema and node-type checks
    return prepared


def test_ray_validates_the_cluster_config(config):
    prepared = _validated(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_a_cpu_head_and_a_gpu_worker_type_with_a_spot_option(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    (gpu,) = [t for name, t in types.items() if t.get("resources", {}).get("GPU")]
    assert 0 <= gpu["min_workers"] < gpu["max_workers"] <= config["max_workers"]
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance family


def test_setup_installs_vlmlab_and_ships_the_specs(config):
    mounts = config["file_mounts"]
    assert "." in mounts.values()  # the repository, specs in experiments/ included
    (repo,) = [remote for remote, local in mounts.items() if local == "."]
    commands = " ".join(config["setup_commands"])
    assert f"-e {repo.replace('/home/ubuntu', '~')}" in commands
    assert "mount -t nfs4" in commands  # the shared results filesystem
    assert all("~/venv/bin/ray start" in c for c in config["worker_start_ray_commands"][1:])


def test_every_node_starts_ray_with_the_front_doors_bounds(config):
    from vlmlab.front import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[section] if "ray start" in c]
        assert f"export {PROXY_CALLBACK_ENV}={PROXY_CALLBACK};" in start, section


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), "node_config"),
        (lambda c: c.update(head_node_type="nope"), "head_node_type"),
        (lambda c: c.update(max_workers="many"), "many"),
    ],
)
def test_ray_validation_catches_a_broken_config(config, mutate, problem):
    broken = copy.deepcopy(config)
    mutate(broken)
    with pytest.raises(Exception, match=problem):
        _validated(broken)
