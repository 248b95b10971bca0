"""Config as pure functions: defaults, .env versus environment, and every kind of bad value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from regcache_core.config import DEFAULTS, ConfigError, DataPlane, load_config, parse_config, parse_size

K8S = {
    "REGCACHE_REGISTRIES": "DOCKERHUB,K8S",
    "K8S_REGISTRY": "registry.k8s.io",
    "K8S_UPSTREAM": "https://registry.k8s.io",
    "K8S_CACHE": "http://127.0.0.1:5004",
}


def parse(**changes: str):
    return parse_config({**DEFAULTS, **changes})


def test_defaults_cache_the_three_big_registries():
    config = load_config(environ={}, env_file="/nonexistent/.env")
    assert [(r.key, r.name, r.upstream, r.cache) for r in config.registries] == [
        ("DOCKERHUB", "docker.io", "https://registry-1.docker.io", "http://127.0.0.1:5001"),
        ("GHCR", "ghcr.io", "https://ghcr.io", "http://127.0.0.1:5002"),
        ("QUAY", "quay.io", "https://quay.io", "http://127.0.0.1:5003"),
    ]
    assert (config.domain, config.port, config.pull_log_stdout) == ("registry.localhost", 5000, False)
    assert config.data_dir == Path("data").absolute()
    assert config.pull_log == config.data_dir / "pull.log"
    assert config.spool_max_disk == 10 << 30
    assert all(r.backend == r.cache for r in config.registries)
    assert (config.tag_ttl, config.manifest_cache_bytes, config.upstream_timeout) == (60, 8 << 20, 5)
    assert config.max_request_head == 64 << 10


def test_env_file_is_read_and_the_real_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("REGISTRY_DOMAIN=from-file.example\nREGCACHE_PORT=5500\nGHCR_CACHE=none\n")
    config = load_config(environ={"REGCACHE_PORT": "6500"}, env_file=env_file)
    assert config.domain == "from-file.example"
    assert config.port == 6500
    assert config.registry("ghcr.io").cache is None


def test_a_registry_is_added_by_environment_alone():
    config = parse_config({**DEFAULTS, **K8S})
    assert [r.name for r in config.registries] == ["docker.io", "registry.k8s.io"]
    k8s = config.registry("registry.k8s.io")
    assert (k8s.key, k8s.upstream, k8s.backend) == ("K8S", "https://registry.k8s.io", "http://127.0.0.1:5004")


@pytest.mark.parametrize("host, url", [
    ("127.0.0.1", "http://127.0.0.1:5080"), ("0.0.0.0", "http://127.0.0.1:5080"), ("::1", "http://[::1]:5080")])
def test_each_cached_registry_has_an_egress_port_by_its_position(host, url):
    config = parse(GHCR_CACHE="none", REGCACHE_EGRESS_HOST=host)
    assert [r.egress_port for r in config.registries] == [5080, None, 5082]
    assert config.egress_registry(5082).name == "quay.io" and config.egress_registry(5081) is None
    assert config.egress_url(config.registry("docker.io")) == url


def test_an_egress_port_of_its_own_wins_over_the_position():
    """As docker-compose.yml pins them: the order of REGCACHE_REGISTRIES then changes nothing."""
    config = parse(**{**K8S, "REGCACHE_REGISTRIES": "K8S,DOCKERHUB,GHCR,QUAY", "K8S_EGRESS_PORT": "5083",
                      "DOCKERHUB_EGRESS_PORT": "5080", "GHCR_EGRESS_PORT": "5081", "QUAY_EGRESS_PORT": "5082"})
    assert {r.key: r.egress_port for r in config.registries} == {"K8S": 5083, "DOCKERHUB": 5080, "GHCR": 5081, "QUAY": 5082}


def test_cache_none_passes_through_to_the_upstream():
    ghcr = parse(GHCR_CACHE="NONE").registry("ghcr.io")
    assert ghcr.cache is None and ghcr.backend == "https://ghcr.io"


def test_values_are_normalised():
    config = parse(
        REGISTRY_DOMAIN=" Registry.Example.COM ",
        DOCKERHUB_REGISTRY="Docker.IO",
        DOCKERHUB_UPSTREAM="https://Registry-1.Docker.io/",
        REGCACHE_PULL_LOG="logs/pulls.jsonl",
        REGCACHE_PULL_LOG_STDOUT="Yes",
    )
    assert config.domain == "registry.example.com"
    assert config.registry("docker.io").upstream == "https://registry-1.docker.io"
    assert config.pull_log == Path("logs/pulls.jsonl").absolute()
    assert config.pull_log_stdout is True


def test_credentials_come_in_pairs_and_stay_out_of_repr():
    hub = parse(DOCKERHUB_USERNAME="alice", DOCKERHUB_PASSWORD="s3cret-pw").registry("docker.io")
    assert (hub.username, hub.password) == ("alice", "s3cret-pw")
    assert "s3cret-pw" not in repr(hub)


@pytest.mark.parametrize("changes, variable, says", [
    ({"DOCKERHUB_UPSTREAM": "registry-1.docker.io"}, "DOCKERHUB_UPSTREAM", "not an http:// or https:// URL"),
    ({"DOCKERHUB_UPSTREAM": "ftp://example.com"}, "DOCKERHUB_UPSTREAM", "not an http:// or https:// URL"),
    ({"DOCKERHUB_UPSTREAM": "http://[::1"}, "DOCKERHUB_UPSTREAM", "not a URL"),
    ({"DOCKERHUB_CACHE": "http://127.0.0.1:abc"}, "DOCKERHUB_CACHE", "not a URL"),
    ({"DOCKERHUB_CACHE": "http://127.0.0.1:70000"}, "DOCKERHUB_CACHE", "not a URL"),
    ({"DOCKERHUB_CACHE": "http://127.0.0.1:0"}, "DOCKERHUB_CACHE", "port 0"),
    ({"DOCKERHUB_UPSTREAM": "https://example.com/v2"}, "DOCKERHUB_UPSTREAM", "no path"),
    ({"DOCKERHUB_UPSTREAM": "https://example.com?x=1"}, "DOCKERHUB_UPSTREAM", "no path"),
    ({"REGCACHE_PORT": "http"}, "REGCACHE_PORT", "not a port number"),
    ({"REGCACHE_PORT": "0"}, "REGCACHE_PORT", "not a port number"),
    ({"REGCACHE_PORT": "65536"}, "REGCACHE_PORT", "not a port number"),
    ({"REGCACHE_PORT": "²"}, "REGCACHE_PORT", "not a port number"),
    ({"REGCACHE_PORT": ""}, "REGCACHE_PORT", "not a port number"),
    ({"REGCACHE_PULL_LOG_STDOUT": "maybe"}, "REGCACHE_PULL_LOG_STDOUT", "not true or false"),
    ({"REGISTRY_DOMAIN": "under_score.example"}, "REGISTRY_DOMAIN", "not a DNS name"),
    ({"REGISTRY_DOMAIN": "example.com:5000"}, "REGISTRY_DOMAIN", "not a DNS name"),
    ({"REGISTRY_DOMAIN": ""}, "REGISTRY_DOMAIN", "not a DNS name"),
    ({"DOCKERHUB_REGISTRY": "docker.io/library"}, "DOCKERHUB_REGISTRY", "not a registry host name"),
    ({"REGCACHE_REGISTRIES": " , "}, "REGCACHE_REGISTRIES", "empty"),
    ({"REGCACHE_REGISTRIES": "DOCKERHUB,ghcr"}, "REGCACHE_REGISTRIES", "'ghcr' is not a key"),
    ({"REGCACHE_REGISTRIES": "DOCKER-HUB"}, "REGCACHE_REGISTRIES", "not a key"),
    ({"REGCACHE_REGISTRIES": "GHCR,DOCKERHUB,GHCR"}, "REGCACHE_REGISTRIES", "'GHCR' is listed twice"),
    ({"QUAY_REGISTRY": "docker.io"}, "QUAY_REGISTRY", "is also DOCKERHUB_REGISTRY"),
    ({"REGCACHE_REGISTRIES": "DOCKERHUB,K8S"}, "K8S_REGISTRY", "not set, and K8S is listed"),
    ({**K8S, "K8S_UPSTREAM": " "}, "K8S_UPSTREAM", "not set"),
    ({**K8S, "K8S_CACHE": ""}, "K8S_CACHE", "not set"),
    ({"GHCR_USERNAME": "alice"}, "GHCR_PASSWORD", "not set, but GHCR_USERNAME is"),
    ({"GHCR_PASSWORD": "s3cret-pw"}, "GHCR_USERNAME", "not set, but GHCR_PASSWORD is"),
    ({"REGCACHE_EGRESS_PORT": "4999"}, "REGCACHE_EGRESS_PORT", "port 5000, which REGCACHE_PORT uses too"),
    ({"REGCACHE_EGRESS_PORT": "65534"}, "REGCACHE_EGRESS_PORT", "past 65535"),
    ({"REGCACHE_EGRESS_PORT": "5069"}, "REGCACHE_EGRESS_PORT", "which REGCACHE_ADMIN_PORT uses too"),
    ({"QUAY_EGRESS_PORT": "5080"}, "QUAY_EGRESS_PORT", "which DOCKERHUB_EGRESS_PORT uses too"),
    ({"GHCR_EGRESS_PORT": "http"}, "GHCR_EGRESS_PORT", "not a port number"),
    ({"REGCACHE_EGRESS_HOST": "cache.local"}, "REGCACHE_EGRESS_HOST", "not an IP address"),
    ({"DOCKERHUB_CACHE": "https://127.0.0.1:5001"}, "DOCKERHUB_CACHE", "without TLS: use http://"),
    ({"REGCACHE_TAG_TTL": "0"}, "REGCACHE_TAG_TTL", "not a number of seconds above 0"),
    ({"REGCACHE_TAG_TTL": "1m"}, "REGCACHE_TAG_TTL", "not a number of seconds"),
    ({"REGCACHE_UPSTREAM_TIMEOUT": "-1"}, "REGCACHE_UPSTREAM_TIMEOUT", "not a number of seconds"),
    ({"REGCACHE_MANIFEST_CACHE": "lots"}, "REGCACHE_MANIFEST_CACHE", "not a size"),
    ({"REGCACHE_SPOOL_MAX_DISK": "lots"}, "REGCACHE_SPOOL_MAX_DISK", "not a size"),
    ({"REGCACHE_MAX_REQUEST_HEAD": "4k"}, "REGCACHE_MAX_REQUEST_HEAD", "too small for a pull's request head: give at least 8k"),
    ({"REGCACHE_MAX_REQUEST_HEAD": "lots"}, "REGCACHE_MAX_REQUEST_HEAD", "not a size"),
])
def test_a_bad_value_is_one_line_naming_the_variable(changes, variable, says):
    with pytest.raises(ConfigError) as raised:
        parse(**changes)
    message = str(raised.value)
    assert message.startswith(f"{variable}: ") and says in message
    assert "\n" not in message
    assert "s3cret" not in message


@pytest.mark.parametrize("url", [
    "https://alice:s3cret-pw@registry-1.docker.io",
    "https://alice:s3cret-pw@registry-1.docker.io:bad",  # fails to parse too: still not echoed
    "https://alice:s3cret-pw@[::1",
    "https://s3cret-token@registry-1.docker.io",
])
def test_a_url_with_credentials_is_refused_without_echoing_them(url):
    with pytest.raises(ConfigError) as raised:
        parse(DOCKERHUB_UPSTREAM=url)
    message = str(raised.value)
    assert message.startswith("DOCKERHUB_UPSTREAM: ") and "_USERNAME/_PASSWORD" in message
    assert "s3cret" not in message and "alice" not in message


def test_a_bad_value_in_the_env_file_is_reported_like_one_in_the_environment(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("REGCACHE_PULL_LOG_STDOUT=sometimes\n")
    with pytest.raises(ConfigError, match=r"^REGCACHE_PULL_LOG_STDOUT: 'sometimes'"):
        load_config(environ={}, env_file=env_file)
    assert load_config(environ={"REGCACHE_PULL_LOG_STDOUT": "off"}, env_file=env_file).pull_log_stdout is False


@pytest.mark.parametrize("value, size", [("0", 0), ("4096", 4096), ("4k", 4096), ("512M", 512 << 20),
                                         ("50G", 50 << 30), ("2TiB", 2 << 40), ("1 MB", 1 << 20), ("3g", 3 << 30)])
def test_sizes_take_binary_units(value, size):
    assert parse_size("X", value) == size


@pytest.mark.parametrize("value", ["", "G", "-1", "1.5G", "12Q", "١٢"])
def test_a_bad_size_names_the_variable(value):
    with pytest.raises(ConfigError, match="^X: .* is not a size"):
        parse_size("X", value)


def test_the_data_plane_settings():
    config = parse()
    assert (config.dataplane.host, config.dataplane.port, config.dataplane.url) == ("", 5050, None)
    assert config.dataplane.min_size == 256 << 10 and config.dataplane.workers >= 1
    assert config.registries[0].storage == config.data_dir / "dockerhub" / "storage"
    config = parse(REGCACHE_DATAPLANE_HOST="::", REGCACHE_DATAPLANE_PORT="6050", REGCACHE_DATAPLANE_URL="http://Cache.example:30050",
                   REGCACHE_DATAPLANE_MIN_SIZE="4M", REGCACHE_DATAPLANE_WORKERS="3", DOCKERHUB_CACHE="http://registry-dockerhub:5000",
                   DOCKERHUB_STORAGE="/caches/dockerhub")
    assert config.dataplane == DataPlane("::", 6050, "http://cache.example:30050", 4 << 20, 3)
    assert config.registries[0].storage == Path("/caches/dockerhub")
    assert config.registries[1].storage == config.data_dir / "ghcr" / "storage"  # on loopback: regcache up runs it
    assert parse(DOCKERHUB_CACHE="http://registry-dockerhub:5000").registries[0].storage is None  # somebody else's
    assert parse(REGCACHE_DATAPLANE="false").dataplane is None


@pytest.mark.parametrize("changes, says", [
    ({"REGCACHE_DATAPLANE_PORT": "5000"}, "REGCACHE_DATAPLANE_PORT: 5000 is taken by REGCACHE_PORT"),
    ({"REGCACHE_DATAPLANE_PORT": "5080"}, "REGCACHE_EGRESS_PORT: gives DOCKERHUB egress port 5080, which REGCACHE_DATAPLANE_PORT uses too"),
    ({"REGCACHE_DATAPLANE_URL": "http://x:1/path"}, "REGCACHE_DATAPLANE_URL: 'http://x:1/path' must be a bare"),
    ({"REGCACHE_DATAPLANE_MIN_SIZE": "big"}, "REGCACHE_DATAPLANE_MIN_SIZE: 'big' is not a size"),
    ({"REGCACHE_DATAPLANE_WORKERS": "0"}, "REGCACHE_DATAPLANE_WORKERS: '0' is not a whole number"),
    ({"REGCACHE_DATAPLANE_HOST": "all"}, "REGCACHE_DATAPLANE_HOST: 'all' is not an IP address"),
    ({"GHCR_CACHE": "none", "GHCR_STORAGE": "/x"}, "GHCR_STORAGE: set, but GHCR_CACHE is none"),
])
def test_bad_data_plane_settings_name_the_variable(changes, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse(**changes)


def test_replicas_share_a_redis_and_a_secret():
    assert parse().cluster is None  # one node
    cluster = parse(REGCACHE_REDIS_URL="redis://:pw@redis:6379/1", REGCACHE_CLUSTER_SECRET="s" * 32,
                    REGCACHE_DATAPLANE_URL="http://10.0.0.7:5050").cluster
    assert cluster.redis_url == "redis://:pw@redis:6379/1" and cluster.redis_timeout == 0.5
    assert cluster.secret == b"s" * 32
    assert "pw" not in repr(cluster) and "sss" not in repr(cluster)


@pytest.mark.parametrize("changes, says", [
    ({"REGCACHE_REDIS_URL": "http://redis:6379"}, "REGCACHE_REDIS_URL: not a redis:// or rediss:// URL"),
    ({"REGCACHE_REDIS_URL": "redis://redis:6379/cache"}, "REGCACHE_REDIS_URL: the path names a database"),
    ({"REGCACHE_REDIS_URL": "redis://redis:99999"}, "REGCACHE_REDIS_URL: not a redis://"),
    ({"REGCACHE_REDIS_URL": "redis://redis"}, "REGCACHE_CLUSTER_SECRET: not set, but REGCACHE_REDIS_URL is"),
    ({"REGCACHE_REDIS_URL": "redis://redis", "REGCACHE_CLUSTER_SECRET": "short"}, "shorter than 16 characters"),
    ({"REGCACHE_CLUSTER_SECRET": "s" * 32}, "REGCACHE_CLUSTER_SECRET: set, but REGCACHE_REDIS_URL is not"),
    ({"REGCACHE_REDIS_URL": "redis://redis", "REGCACHE_CLUSTER_SECRET": "s" * 32, "REGCACHE_REDIS_TIMEOUT": "0"},
     "REGCACHE_REDIS_TIMEOUT"),
    # Each replica's data plane serves the cold blobs it downloads to the others.
    ({"REGCACHE_REDIS_URL": "redis://redis", "REGCACHE_CLUSTER_SECRET": "s" * 32},
     "REGCACHE_DATAPLANE_URL: not set, but REGCACHE_REDIS_URL is"),
])
def test_bad_replica_settings_name_the_variable(changes, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse(**changes)
