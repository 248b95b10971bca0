"""Client-side configuration: the files that point containerd, k3s/k3d, Docker and skopeo/podman
at regcache, rendered from a Config.

Two ways to address regcache:
- virtual hosts (the default): registry R is `http://R.<REGISTRY_DOMAIN>:<port>`; every client
  can use them, but the names must resolve to regcache;
- one endpoint (`http://<ip or host>:<port>`), for containerd only: containerd names the registry
  in `?ns=R` on every request, so no DNS is needed. Docker and skopeo/podman send no `ns`, so
  their files always use virtual hosts.

The renderers are pure (Config in, text out); `write_client_files` is the only part that writes.
The outputs are small and regular, so they are written as text; every string goes through
`_quoted`, whose JSON string syntax is also a valid TOML basic string and YAML double-quoted scalar.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from .config import Config, ConfigError, Registry, base_url

DOCKER_HUB = "docker.io"  # the only registry Docker's registry-mirrors applies to
HEADER = "Written by `regcache client-config`; run it again after changing regcache's settings."


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


def hosts_toml(server: str, mirror: str) -> str:
    """containerd's certs.d/<registry>/hosts.toml: regcache first, then `server` (the upstream).

    containerd tries the hosts in order and moves on after a connection error or any status
    above 399, so a pull still works while regcache is down or does not map the registry.
    """
    return (
        f"# {HEADER}\n"
        f"server = {_quoted(server)}\n"
        "\n"
        f"[host.{_quoted(mirror)}]\n"
        '  capabilities = ["pull", "resolve"]\n'
    )


def containerd_hosts(config: Config, endpoint: str | None = None) -> dict[str, str]:
    """certs.d/<registry>/hosts.toml for every registry regcache serves."""
    return {
        f"certs.d/{registry.name}/hosts.toml": hosts_toml(
            registry.upstream, containerd_mirror_url(config, registry, endpoint)
        )
        for registry in config.registries
    }


def registries_yaml(config: Config, endpoint: str | None = None) -> str:
    """k3s's /etc/rancher/k3s/registries.yaml (k3d: --registry-config).

    k3s adds the registry's default endpoint after these by itself, so that is the fallback.
    Plain http endpoints need no `configs` entry: that section only holds TLS and credentials.
    """
    lines = [f"# {HEADER}", "mirrors:"]
    for registry in config.registries:
        lines += [
            f"  {_quoted(registry.name)}:",
            "    endpoint:",
            f"      - {_quoted(containerd_mirror_url(config, registry, endpoint))}",
        ]
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


def client_files(config: Config, endpoint: str | None = None) -> dict[str, str]:
    """Every client file, by path relative to the output directory."""
    files = {
        "registries.yaml": registries_yaml(config, endpoint),
        **containerd_hosts(config, endpoint),
        "registries.conf": registries_conf(config),
    }
    if (daemon := daemon_json(config)) is not None:
        files["daemon.json"] = daemon
    return files


def write_client_files(out_dir: Path, files: dict[str, str]) -> list[Path]:
    written = []
    for relative, text in files.items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def _quoted(value: str) -> str:
    return json.dumps(value)

