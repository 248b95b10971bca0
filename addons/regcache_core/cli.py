"""The `regcache` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .client_config import client_files, parse_endpoint, write_client_files
from .config import Config, ConfigError, load_config
from .launcher import up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regcache", description="A pull-through cache for container registries.")
    parser.add_argument("--env-file", help="settings file (default: ./.env, if there); the environment wins over it")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run the registry:2 caches and the proxy until Ctrl-C")
    client_config = commands.add_parser(
        "client-config", help="write the client files: registries.yaml, certs.d/*/hosts.toml, daemon.json, registries.conf"
    )
    client_config.add_argument("--out", required=True, type=Path, help="directory to write them into")
    client_config.add_argument(
        "--endpoint",
        help="one URL for containerd/k3s, e.g. http://10.0.0.5:5000 (it names the registry in ?ns=); "
        "default: a virtual host per registry, http://<registry>.<REGISTRY_DOMAIN>:<port>",
    )
    args = parser.parse_args(argv)
    if args.env_file and not Path(args.env_file).is_file():
        print(f"regcache: --env-file: {args.env_file} is not a file", file=sys.stderr)
        return 2
    env_file = args.env_file or ".env"

    try:
        config = load_config(env_file=env_file)
        if args.command == "client-config":
            endpoint = parse_endpoint(args.endpoint) if args.endpoint else None
            return write_client_config(config, args.out, endpoint)
    except ConfigError as e:
        print(f"regcache: {e}", file=sys.stderr)
        return 2
    return up(config, env_file)


def write_client_config(config: Config, out: Path, endpoint: str | None) -> int:
    for path in write_client_files(out, client_files(config, endpoint)):
        print(f"wrote {path}")
    if endpoint:
        print(f"Docker and skopeo/podman send no ?ns=: daemon.json and registries.conf name "
              f"<registry>.{config.domain}, which must resolve to regcache.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
