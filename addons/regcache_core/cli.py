"""The `regcache` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .launcher import up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regcache", description="A pull-through cache for container registries.")
    parser.add_argument("--env-file", help="settings file (default: ./.env, if there); the environment wins over it")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run the registry:2 caches and the proxy until Ctrl-C")
    args = parser.parse_args(argv)
    if args.env_file and not Path(args.env_file).is_file():
        print(f"regcache: --env-file: {args.env_file} is not a file", file=sys.stderr)
        return 2
    env_file = args.env_file or ".env"

    try:
        config = load_config(env_file=env_file)
    except ConfigError as e:
        print(f"regcache: {e}", file=sys.stderr)
        return 2
    return up(config, env_file)


if __name__ == "__main__":
    sys.exit(main())
