"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

Debian's docker-compose validates and resolves the file (`config`, no engine needed), and the
resolved configuration is then held to what a user relies on. The proxy's healthcheck command
is run for real against `regcache up` in tests/e2e/test_compose.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.support.parts import REPO
from regcache_core.stack.caches import local_backends
from regcache_core.config import DEFAULTS, parse_config

PROXY = "registry-cache"
CACHES = {"DOCKERHUB": "registry-dockerhub", "GHCR": "registry-ghcr", "QUAY": "registry-quay"}
REGCACHE_UP = ["regcache", "up"]
REPLICAS = REPO / "deploy" / "compose" / "replicas.yml"  # the example of two replicas
REPLICA_SECRETS = {"REGCACHE_CLUSTER_SECRET": "c" * 64, "REDIS_PASSWORD": "p" * 32, "REGCACHE_HOST": "cache.example.com"}


def credentials(key: str) -> tuple[str, str]:
    return f"user-{key.lower()}", f"secret-{key.lower()}-must-not-leak"


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory):
    """A project directory with a .env made from .env.example, plus credentials for every cache."""
    directory = tmp_path_factory.mktemp("compose")
    lines = [(REPO / ".env.example").read_text()]
    for key in CACHES:
        username, password = credentials(key)
        lines.append(f"{key}_USERNAME={username}\n{key}_PASSWORD={password}\n")
    (directory / ".env").write_text("\n".join(lines))
    return directory


def docker_compose(project_dir, *args: str, file: Path = REPO / "docker-compose.yml") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker-compose", "-f", str(file), "--project-directory", str(project_dir), *args],
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture(scope="module")
def resolved(project_dir) -> dict:
    """`docker-compose config`: the file with .env interpolated and anchors merged."""
    result = docker_compose(project_dir, "config")
    assert result.returncode == 0, result.stderr
    return YAML(typ="safe").load(result.stdout)


def test_docker_compose_accepts_the_file(project_dir):
    result = docker_compose(project_dir, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_services_and_the_published_ports_of_the_proxy_and_its_data_plane(resolved):
    services = resolved["services"]
    assert set(services) == {PROXY, *CACHES.values()}
    assert services[PROXY]["container_name"] == PROXY
    config = parse_config({**DEFAULTS, **services[PROXY]["environment"]})
    published = [(str(p["published"]), str(p["target"])) for p in services[PROXY]["ports"]]
    assert published == [("5000", str(config.port)), ("5050", str(config.dataplane.port))]
    assert [name for name, service in services.items() if service.get("ports")] == [PROXY]


def test_the_proxy_reads_each_cache_volume_read_only_where_its_storage_setting_says(resolved):
    proxy = resolved["services"][PROXY]
    config = parse_config({**DEFAULTS, **proxy["environment"]})
    mounts = {volume.split(":")[1]: volume for volume in proxy["volumes"]}
    for registry in config.registries:
        cache_volume = resolved["services"][CACHES[registry.key]]["volumes"][0].split(":")[0]
        assert mounts[str(registry.storage)] == f"{cache_volume}:{registry.storage}:ro"


def test_clients_reach_only_the_proxy_on_the_network_named_registry_cache(resolved):
    assert resolved["networks"]["registry-cache"]["name"] == "registry-cache"
    assert resolved["networks"]["regcache-internal"]["internal"] is True
    assert sorted(resolved["services"][PROXY]["networks"]) == ["regcache-internal", "registry-cache"]
    for name in CACHES.values():
        assert list(resolved["services"][name]["networks"]) == ["regcache-internal"]


def test_every_service_has_a_named_volume_and_a_healthcheck(resolved):
    named_volumes = set(resolved["volumes"])
    sources = []
    for name, service in resolved["services"].items():
        source = service["volumes"][0].split(":")[0]
        assert source in named_volumes, f"{name} keeps its data in {source!r}, not a named volume"
        sources.append(source)
        assert service["healthcheck"]["test"][0] == "CMD", name
    assert len(set(sources)) == len(sources), "each service has a volume of its own"


def test_caches_are_registry2_pull_through_caches_of_the_proxys_egress_without_credentials(resolved):
    environment = resolved["services"][PROXY]["environment"]
    # The egress ports are pinned: a user's REGCACHE_REGISTRIES order can't move them.
    config = parse_config({**DEFAULTS, **environment, "REGCACHE_REGISTRIES": "QUAY,GHCR,DOCKERHUB"})
    assert config.egress_host == "0.0.0.0"
    for registry in config.registries:
        service = resolved["services"][CACHES[registry.key]]
        assert service["image"] == "registry:2"
        assert service["environment"] == {
            "REGISTRY_PROXY_REMOTEURL": f"http://{PROXY}:{registry.egress_port}",
            "REGISTRY_STORAGE_DELETE_ENABLED": "true",
            "REGISTRY_STORAGE_MAINTENANCE_UPLOADPURGING": "{enabled: true, age: 1h, interval: 10m, dryrun: false}",
            "REGISTRY_HTTP_DRAINTIMEOUT": "10s",
        }
        assert "/var/lib/registry" in service["volumes"][0]
        assert service["depends_on"] == {PROXY: {"condition": "service_started"}}


def test_proxy_runs_regcache_up_with_the_compose_caches_and_starts_none_itself(resolved):
    proxy = resolved["services"][PROXY]
    assert proxy["command"] == REGCACHE_UP
    config = parse_config({**DEFAULTS, **proxy["environment"]})
    assert {r.key: r.cache for r in config.registries} == {
        key: f"http://{name}:5000" for key, name in CACHES.items()
    }
    assert local_backends(config) == []
    assert str(config.data_dir) == "/data"
    assert proxy["volumes"][0].split(":")[1] == "/data"


def test_no_secret_on_any_command_line(resolved):
    passwords = [credentials(key)[1] for key in CACHES]
    for name, service in resolved["services"].items():
        command_lines = json.dumps([service.get("command"), service.get("entrypoint"), service["healthcheck"]])
        assert not [p for p in passwords if p in command_lines], name


def test_image_runs_regcache_up_and_never_gets_the_env_file():
    instructions = [line.split(None, 1) for line in (REPO / "Dockerfile").read_text().splitlines()
                    if line and not line.startswith((" ", "#"))]
    assert "ENTRYPOINT" not in [word for word, *_ in instructions]
    assert json.loads([rest for word, rest in instructions if word == "CMD"][-1]) == REGCACHE_UP
    # .dockerignore lists what the build may see, after excluding everything.
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert patterns[0] == "*" and not [p for p in patterns if p.startswith("!.env")]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict:
    """deploy/compose/replicas.yml resolved, from the repository's root with .env.example and its three settings."""
    directory = tmp_path_factory.mktemp("compose-replicas")
    secrets = "".join(f"{name}={value}\n" for name, value in REPLICA_SECRETS.items())
    (directory / ".env").write_text((REPO / ".env.example").read_text() + secrets)
    result = docker_compose(directory, "config", file=REPLICAS)
    assert result.returncode == 0, result.stderr
    return YAML(typ="safe").load(result.stdout)


def test_the_replicas_example_wants_its_secrets_in_env(tmp_path):
    (tmp_path / ".env").write_text((REPO / ".env.example").read_text())
    result = docker_compose(tmp_path, "config", "-q", file=REPLICAS)
    assert result.returncode != 0 and "set REDIS_PASSWORD in .env" in result.stderr


def test_two_replicas_share_redis_and_the_caches_volume_each_on_ports_of_its_own(replicas):
    services = replicas["services"]
    assert set(services) == {"regcache-a", "regcache-b", "redis"}
    data_volumes, published = set(), []
    for name in ("regcache-a", "regcache-b"):
        service = services[name]
        assert service["command"] == REGCACHE_UP
        config = parse_config({**DEFAULTS, **service["environment"]})
        assert config.cluster.redis_url == f"redis://:{REPLICA_SECRETS['REDIS_PASSWORD']}@redis:6379/0"
        assert config.cluster.secret == REPLICA_SECRETS["REGCACHE_CLUSTER_SECRET"].encode()
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        assert mounts["/cache"] == "caches" and str(config.data_dir) == "/data"
        data_volumes.add(mounts["/data"])
        # It runs every cache itself, on the shared volume, with a budget (its only evictor).
        assert [backend.storage.parent for backend in local_backends(config)] == [Path("/cache")] * len(config.registries)
        assert config.max_disk is not None
        # A 307 names this replica's data plane on the Docker host: published as it is.
        ports = [(str(p["published"]), str(p["target"])) for p in service["ports"]]
        assert ports == [(str(config.port),) * 2, (str(config.dataplane.port),) * 2]
        assert config.dataplane.url == f"http://{REPLICA_SECRETS['REGCACHE_HOST']}:{config.dataplane.port}"
        published += [host for host, _ in ports]
    assert len(data_volumes) == 2 and len(set(published)) == 4
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--requirepass") + 1] == REPLICA_SECRETS["REDIS_PASSWORD"]
