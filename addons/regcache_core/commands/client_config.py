"""Client-side configuration: the files that point containerd, k3s/k3d, Docker and skopeo/podman
at regcache, rendered from a Config.

Two ways to address regcache:
- virtual hosts (the default): registry R is `http://R.<REGISTRY_DOMAIN>:<port>`; every client
  can use them, but the names must resolve to regcache;
- one endpoint (`http://<ip or host>:<port>`), for containerd only: containerd names the registry
  in `?ns=R` on every request, so no DNS is needed. Docker and skopeo/podman send no `ns`, so
  their files always use virtual hosts.

With client accounts (REGCACHE_HTPASSWD), `--username` and a password make every file carry
credentials where its client reads them: containerd a static Authorization header in hosts.toml,
k3s `configs.<host>.auth` in registries.yaml, skopeo/podman an auth.json. Those files are
written readable by their owner only.

The renderers are pure (Config in, text out); `write_client_files` is the only part that writes.
The outputs are small and regular, so they are written as text; every string goes through
`_quoted`, whose JSON string syntax is also a valid TOML basic string and YAML double-quoted scalar.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..config import Config, ConfigError, Registry, base_url

DOCKER_HUB = "docker.io"  # the only registry Docker's registry-mirrors applies to
HEADER = "Written by `regcache client-config`; run it again after changing regcache's settings."


@dataclass(frozen=True)
class Credentials:
    """A client account of regcache's (REGCACHE_HTPASSWD), for the clients' files."""

    username: str
    password: str

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def parse_endpoint(value: str) -> str:
    """Check a --endpoint value: a bare http(s)://host[:port] URL."""
    return base_url("--endpoint", value)


def has_virtual_host(registry: Registry) -> bool:
    """A registry named with a port (`host:5443`) has no virtual host: the name would hold a colon."""
    return ":" not in registry.name


def virtual_host_url(config: Config, registry: Registry) -> str:
    if not has_virtual_host(registry):
        raise ConfigError(
            f"{registry.key}_REGISTRY: {registry.name!r} has a port, so it has no virtual host name; "
            "use --endpoint (containerd names it in ?ns=)"
        )
    return f"http://{registry.name}.{config.domain}:{config.port}"


def containerd_mirror_url(config: Config, registry: Registry, endpoint: str | None) -> str:
    """Where containerd (and k3s) reach regcache for `registry`: the one endpoint, or its virtual host."""
    return endpoint or virtual_host_url(config, registry)


def hosts_toml(server: str, mirror: str, credentials: Credentials | None = None) -> str:
    """containerd's certs.d/<registry>/hosts.toml: regcache first, then `server` (the upstream).

    containerd tries the hosts in order and moves on after a connection error or any status
    above 399, so a pull still works while regcache is down or does not map the registry.
    Credentials go in a header containerd sends to regcache only (never to `server`).
    """
    text = (
        f"# {HEADER}\n"
        f"server = {_quoted(server)}\n"
        "\n"
        f"[host.{_quoted(mirror)}]\n"
        '  capabilities = ["pull", "resolve"]\n'
    )
    if credentials:
        text += f"[host.{_quoted(mirror)}.header]\n  Authorization = {_quoted(credentials.basic())}\n"
    return text


def containerd_hosts(config: Config, endpoint: str | None = None, credentials: Credentials | None = None) -> dict[str, str]:
    """certs.d/<registry>/hosts.toml for every registry regcache serves."""
    return {
        f"certs.d/{registry.name}/hosts.toml": hosts_toml(
            registry.upstream, containerd_mirror_url(config, registry, endpoint), credentials
        )
        for registry in config.registries
    }


def registries_yaml(config: Config, endpoint: str | None = None, credentials: Credentials | None = None) -> str:
    """k3s's /etc/rancher/k3s/registries.yaml (k3d: --registry-config).

    k3s adds the registry's default endpoint after these by itself, so that is the fallback.
    Plain http endpoints need a `configs` entry only for credentials (keyed by the endpoint's
    host:port, as k3s looks them up).
    """
    lines = [f"# {HEADER}", "mirrors:"]
    mirrors = [containerd_mirror_url(config, registry, endpoint) for registry in config.registries]
    for registry, mirror in zip(config.registries, mirrors):
        lines += [f"  {_quoted(registry.name)}:", "    endpoint:", f"      - {_quoted(mirror)}"]
    if credentials:
        lines.append("configs:")
        for host in dict.fromkeys(urlsplit(mirror).netloc for mirror in mirrors):
            lines += [f"  {_quoted(host)}:", "    auth:", f"      username: {_quoted(credentials.username)}",
                      f"      password: {_quoted(credentials.password)}"]
    return "\n".join(lines) + "\n"


def daemon_json(config: Config) -> str | None:
    """The Docker daemon.json fragment, or None when regcache does not serve docker.io.

    dockerd applies registry-mirrors to docker.io only and sends no `ns`, so it needs docker.io's
    virtual host; a mirror URL with a path is refused. insecure-registries takes host:port.
    """
    registry = config.registry(DOCKER_HUB)
    if registry is None:
        return None
    mirror = virtual_host_url(config, registry)
    fragment = {"registry-mirrors": [mirror], "insecure-registries": [urlsplit(mirror).netloc]}
    return json.dumps(fragment, indent=2) + "\n"


def registries_conf(config: Config) -> str:
    """containers-registries.conf (v2) for skopeo, podman and buildah: one mirror per registry.

    The primary location stays the registry itself, so they fall back to it when the mirror fails.
    They send no `ns`, so a registry without a virtual host is left out.
    """
    blocks = [f"# {HEADER}\n"]
    for registry in filter(has_virtual_host, config.registries):
        blocks.append(
            "[[registry]]\n"
            f"prefix = {_quoted(registry.name)}\n"
            f"location = {_quoted(registry.name)}\n"
            "\n"
            "[[registry.mirror]]\n"
            f"location = {_quoted(urlsplit(virtual_host_url(config, registry)).netloc)}\n"
            "insecure = true\n"
        )
    return "\n".join(blocks)


def auth_json(config: Config, credentials: Credentials) -> str:
    """containers-auth.json for skopeo, podman and buildah (`--authfile`, or
    $XDG_RUNTIME_DIR/containers/auth.json): they look credentials up by the mirror's host:port."""
    auth = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    hosts = [urlsplit(virtual_host_url(config, r)).netloc for r in filter(has_virtual_host, config.registries)]
    return json.dumps({"auths": {host: {"auth": auth} for host in hosts}}, indent=2) + "\n"


def client_files(config: Config, endpoint: str | None = None, credentials: Credentials | None = None) -> dict[str, str]:
    """Every client file, by path relative to the output directory."""
    files = {
        "registries.yaml": registries_yaml(config, endpoint, credentials),
        **containerd_hosts(config, endpoint, credentials),
        "registries.conf": registries_conf(config),
    }
    if credentials:
        files["auth.json"] = auth_json(config, credentials)
    if (daemon := daemon_json(config)) is not None:
        files["daemon.json"] = daemon
    return files


def write_client_files(out_dir: Path, files: dict[str, str], private: bool = False) -> list[Path]:
    """Write the files; `private` (they hold credentials) makes them readable by their owner only."""
    written = []
    for relative, text in files.items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if private:
            os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
        written.append(path)
    return written


def _quoted(value: str) -> str:
    return json.dumps(value)

