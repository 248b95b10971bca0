"""The client files as pure functions of the settings, and `regcache client-config`'s errors.
The real clients reading them are in test_clients.py."""

from __future__ import annotations

import json
import os
import subprocess
import tomllib

import pytest
from ruamel.yaml import YAML

from regcache_core.cli import main
from regcache_core.commands.client_config import client_files
from regcache_core.config import DEFAULTS, ConfigError, parse_config

from parts import REGCACHE

K8S_WITH_PORT = {
    "REGCACHE_REGISTRIES": "K8S,LOCAL",
    "K8S_REGISTRY": "registry.k8s.io",
    "K8S_UPSTREAM": "https://registry.k8s.io",
    "K8S_CACHE": "none",
    "LOCAL_REGISTRY": "registry.example:5443",
    "LOCAL_UPSTREAM": "https://registry.example:5443",
    "LOCAL_CACHE": "http://127.0.0.1:5005",
}


def test_every_registry_gets_a_hosts_toml_with_its_upstream_as_server():
    files = client_files(parse_config({**DEFAULTS, **K8S_WITH_PORT, "REGCACHE_PORT": "5500"}), "http://10.0.0.5:5500")
    # containerd looks registries with a port up as certs.d/<host>:<port>/hosts.toml.
    assert {name for name in files if name.startswith("certs.d/")} == {
        "certs.d/registry.k8s.io/hosts.toml", "certs.d/registry.example:5443/hosts.toml"}
    hosts = tomllib.loads(files["certs.d/registry.example:5443/hosts.toml"])
    assert hosts == {"server": "https://registry.example:5443",
                     "host": {"http://10.0.0.5:5500": {"capabilities": ["pull", "resolve"]}}}
    mirrors = YAML(typ="safe").load(files["registries.yaml"])["mirrors"]
    assert mirrors == {"registry.k8s.io": {"endpoint": ["http://10.0.0.5:5500"]},
                       "registry.example:5443": {"endpoint": ["http://10.0.0.5:5500"]}}
    # skopeo sends no ?ns=, and a name with a port makes no virtual host: it is left out.
    assert [r["prefix"] for r in tomllib.loads(files["registries.conf"])["registry"]] == ["registry.k8s.io"]


def test_a_registry_with_a_port_needs_the_endpoint_style():
    with pytest.raises(ConfigError, match="LOCAL_REGISTRY: 'registry.example:5443' has a port.*use --endpoint"):
        client_files(parse_config({**DEFAULTS, **K8S_WITH_PORT}))


def test_without_docker_io_there_is_no_daemon_json():
    assert "daemon.json" not in client_files(parse_config({**DEFAULTS, **K8S_WITH_PORT}), "http://10.0.0.5:5000")


def test_one_endpoint_applies_to_containerd_and_k3s_only():
    files = client_files(parse_config(dict(DEFAULTS)), endpoint="http://10.0.0.5:5000")
    assert all(tomllib.loads(files[f"certs.d/{r}/hosts.toml"])["host"] == {"http://10.0.0.5:5000": {"capabilities": ["pull", "resolve"]}}
               for r in ("docker.io", "ghcr.io", "quay.io"))
    assert {m["endpoint"][0] for m in YAML(typ="safe").load(files["registries.yaml"])["mirrors"].values()} == {"http://10.0.0.5:5000"}
    assert json.loads(files["daemon.json"])["registry-mirrors"] == ["http://docker.io.registry.localhost:5000"]
    assert [r["mirror"][0]["location"] for r in tomllib.loads(files["registries.conf"])["registry"]] == [
        "docker.io.registry.localhost:5000", "ghcr.io.registry.localhost:5000", "quay.io.registry.localhost:5000"]


def test_client_config_command_writes_the_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .env here
    assert main(["client-config", "--out", str(tmp_path / "out"), "--endpoint", "http://10.0.0.5:5000/"]) == 0
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == ["certs.d/docker.io/hosts.toml", "certs.d/ghcr.io/hosts.toml", "certs.d/quay.io/hosts.toml",
                       "daemon.json", "registries.conf", "registries.yaml"]
    assert "Docker and skopeo/podman send no ?ns=" in capsys.readouterr().out


def test_client_config_refuses_an_endpoint_with_a_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["client-config", "--out", str(tmp_path / "out"), "--endpoint", "http://10.0.0.5:5000/v2"]) == 2
    assert "--endpoint: 'http://10.0.0.5:5000/v2' must be a bare scheme://host[:port]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_client_config_into_a_directory_it_cannot_write_says_so_in_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(read_only), str(read_only)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGCACHE_", "REGISTRY_DOMAIN"))}
    try:
        for out, failed, reason in [
            (tmp_path / "a-file" / "out", tmp_path / "a-file" / "out", "Not a directory"),
            (read_only, read_only / "registries.yaml", "Read-only file system"),
        ]:
            result = subprocess.run([*REGCACHE, "client-config", "--out", str(out)], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=30)
            assert (result.returncode, result.stderr.splitlines(), result.stdout) == (
                2, [f"regcache client-config: --out {out}: cannot write {failed}: {reason}"], "")
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
