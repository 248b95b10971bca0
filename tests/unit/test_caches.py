"""The registry:2 caches `regcache up` runs: the configuration written for each (stack/caches.py)."""

from __future__ import annotations

import json

import pytest

from regcache_core.config import DEFAULTS, parse_config
from regcache_core.stack.caches import local_backends, registry_config, write_registry_config


def backend(tmp_path, **settings: str):
    config = parse_config({**DEFAULTS, "REGCACHE_DATA_DIR": str(tmp_path / "data"), "REGCACHE_REGISTRIES": "DOCKERHUB",
                           **settings})
    [dockerhub] = local_backends(config)
    return dockerhub


def test_a_cache_on_storage_of_its_own_keeps_its_config_and_log_in_the_data_dir(tmp_path):
    shared = tmp_path / "shared" / "dockerhub"
    dockerhub = backend(tmp_path, DOCKERHUB_STORAGE=str(shared))
    written = json.loads(write_registry_config(dockerhub).read_text())
    assert dockerhub.config_file == tmp_path / "data" / "dockerhub" / "config.yml"
    assert written["storage"]["filesystem"]["rootdirectory"] == str(shared) and shared.is_dir()


def test_replicas_caches_share_one_http_secret_derived_from_the_cluster_secret(tmp_path):
    cluster = {"REGCACHE_REDIS_URL": "redis://10.0.0.5:6379/0", "REGCACHE_CLUSTER_SECRET": "s" * 32,
               "REGCACHE_DATAPLANE_URL": "http://10.0.0.7:5050"}
    replicas = [backend(tmp_path / name, **cluster) for name in ("a", "b")]
    secrets = {registry_config(replica)["http"]["secret"] for replica in replicas}
    assert len(secrets) == 1 and "s" * 32 not in secrets.pop()
    other = backend(tmp_path / "c", **{**cluster, "REGCACHE_CLUSTER_SECRET": "t" * 32})
    assert registry_config(other)["http"]["secret"] != registry_config(replicas[0])["http"]["secret"]


def test_a_single_node_gets_a_random_http_secret_each_start(tmp_path):
    assert registry_config(backend(tmp_path))["http"]["secret"] != registry_config(backend(tmp_path))["http"]["secret"]


@pytest.mark.parametrize("budget, deletes", [
    ({}, True),  # registry:2's 7-day expiry is then the only bound
    ({"REGCACHE_MAX_DISK": "10G"}, False),
    ({"DOCKERHUB_MAX_DISK": "5G"}, False),
])
def test_registry_2_deletes_what_it_expires_only_for_a_cache_without_a_budget(tmp_path, budget, deletes):
    assert registry_config(backend(tmp_path, **budget))["storage"]["delete"] == {"enabled": deletes}
