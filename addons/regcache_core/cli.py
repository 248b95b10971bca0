"""The `regcache` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .client_config import Credentials, client_files, parse_endpoint, write_client_files
from .config import Config, ConfigError, load_config
from .launcher import up
from .stats import format_table, summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regcache", description="A pull-through cache for container registries.")
    parser.add_argument("--env-file", help="settings file (default: ./.env, if there); the environment wins over it")
    commands = parser.add_subparsers(dest="command", required=True)
    up_command = commands.add_parser("up", help="run the registry:2 caches and the proxy until Ctrl-C")
    up_command.add_argument("--web", action="store_true", help="run mitmweb (live pulls on http://127.0.0.1:8081) instead of mitmdump")
    stats_command = commands.add_parser("stats", help="pulls, bytes and hit ratios per registry and image, from the pull log")
    stats_command.add_argument("pull_log", nargs="?", type=Path, help="pull log to read (default: the configured one)")
    stats_command.add_argument("--json", action="store_true", help="print JSON for machines instead of tables")
    stats_command.add_argument("--top", type=int, default=10, help="images, clients and slow transfers to list (default: 10)")
    client_config = commands.add_parser(
        "client-config", help="write the client files: registries.yaml, certs.d/*/hosts.toml, daemon.json, registries.conf"
    )
    client_config.add_argument("--out", required=True, type=Path, help="directory to write them into")
    client_config.add_argument(
        "--endpoint",
        help="one URL for containerd/k3s, e.g. http://10.0.0.5:5000 (it names the registry in ?ns=); "
        "default: a virtual host per registry, http://<registry>.<REGISTRY_DOMAIN>:<port>",
    )
    client_config.add_argument("--username", help="an account of REGCACHE_HTPASSWD: the files then carry its credentials")
    client_config.add_argument("--password-stdin", action="store_true", help="read that account's password from standard input")
    args = parser.parse_args(argv)
    if args.env_file and not Path(args.env_file).is_file():
        print(f"regcache: --env-file: {args.env_file} is not a file", file=sys.stderr)
        return 2
    env_file = args.env_file or ".env"

    if args.command == "stats" and args.pull_log is not None:
        return stats(args.pull_log, args.json, args.top)
    try:
        config = load_config(env_file=env_file)
        if args.command == "client-config":
            endpoint = parse_endpoint(args.endpoint) if args.endpoint else None
            if bool(args.username) != args.password_stdin:
                print("regcache client-config: --username and --password-stdin go together", file=sys.stderr)
                return 2
            credentials = Credentials(args.username, sys.stdin.readline().rstrip("\r\n")) if args.username else None
            return write_client_config(config, args.out, endpoint, credentials)
    except ConfigError as e:
        print(f"regcache: {e}", file=sys.stderr)
        return 2
    if args.command == "stats":
        return stats(config.pull_log, args.json, args.top)
    return up(config, env_file, web=args.web)


def stats(pull_log: Path, as_json: bool, top: int) -> int:
    if top < 1:
        print("regcache stats: --top must be at least 1", file=sys.stderr)
        return 2
    try:
        with open(pull_log, encoding="utf-8", errors="replace") as lines:
            summary = summarize(lines, slowest=top)
    except OSError as e:
        print(f"regcache stats: cannot read the pull log {pull_log}: {e.strerror}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if as_json else format_table(summary, top))
    return 0


def write_client_config(config: Config, out: Path, endpoint: str | None, credentials: Credentials | None) -> int:
    for path in write_client_files(out, client_files(config, endpoint, credentials), private=credentials is not None):
        print(f"wrote {path}")
    if config.htpasswd and not credentials:
        print("REGCACHE_HTPASSWD is set: give --username and --password-stdin so that the files carry credentials.")
    if credentials and config.registry("docker.io"):
        print("dockerd has no setting for a mirror's credentials: admit Docker hosts by REGCACHE_CLIENTS instead.")
    if endpoint:
        print(f"Docker and skopeo/podman send no ?ns=: daemon.json and registries.conf name "
              f"<registry>.{config.domain}, which must resolve to regcache.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
