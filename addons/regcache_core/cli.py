"""The `regcache` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .client_config import client_files, parse_endpoint, write_client_files
from .config import Config, ConfigError, load_config
from .launcher import up
from .stats import format_table, summarize


ENV_FILE_HELP = "settings file (default: ./.env, if there); the environment wins over it"


def main(argv: list[str] | None = None) -> int:
    try:
        status = run(argv)
        sys.stdout.flush()  # here, so that a closed pipe is seen here rather than at exit
        return status
    except BrokenPipeError:
        # The reader stopped early (`regcache stats --json | head`): nothing left to say. Point
        # stdout at /dev/null so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a program ended by SIGPIPE
    except KeyboardInterrupt:
        return 130  # Ctrl-C before `regcache up` took over the signal, or in another command


def run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="regcache", description="A pull-through cache for container registries.")
    parser.add_argument("--env-file", help=ENV_FILE_HELP)
    # Also after the command (`regcache up --env-file X`); given there, it wins.
    env_file_option = argparse.ArgumentParser(add_help=False)
    env_file_option.add_argument("--env-file", default=argparse.SUPPRESS, help=ENV_FILE_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    up_command = commands.add_parser("up", parents=[env_file_option], help="run the registry:2 caches and the proxy until Ctrl-C")
    up_command.add_argument("--web", action="store_true", help="run mitmweb (live pulls on http://127.0.0.1:8081) instead of mitmdump")
    stats_command = commands.add_parser("stats", parents=[env_file_option], help="pulls, bytes and hit ratios per registry and image, from the pull log")
    stats_command.add_argument("pull_log", nargs="?", type=Path, help="pull log to read (default: the configured one)")
    stats_command.add_argument("--json", action="store_true", help="print JSON for machines instead of tables")
    stats_command.add_argument("--top", type=int, default=10, help="images, clients and slow transfers to list (default: 10)")
    client_config = commands.add_parser(
        "client-config", parents=[env_file_option], help="write the client files: registries.yaml, certs.d/*/hosts.toml, daemon.json, registries.conf"
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

    if args.command == "stats" and args.pull_log is not None:
        return stats(args.pull_log, args.json, args.top)
    try:
        config = load_config(env_file=env_file)
        if args.command != "up":  # under `regcache up` the proxy logs them, once
            for warning in config.warnings:
                print(f"regcache: {warning}", file=sys.stderr)
        if args.command == "client-config":
            endpoint = parse_endpoint(args.endpoint) if args.endpoint else None
            return write_client_config(config, args.out, endpoint)
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


def write_client_config(config: Config, out: Path, endpoint: str | None) -> int:
    for path in write_client_files(out, client_files(config, endpoint)):
        print(f"wrote {path}")
    if endpoint:
        print(f"Docker and skopeo/podman send no ?ns=: daemon.json and registries.conf name "
              f"<registry>.{config.domain}, which must resolve to regcache.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
