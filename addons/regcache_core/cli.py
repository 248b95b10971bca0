"""The `regcache` command."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .launcher import up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regcache", description="A pull-through cache for container registries.")
    parser.add_argument("--env-file", default=".env", help="settings file (default: ./.env); the environment wins over it")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run the registry:2 caches and the proxy until Ctrl-C")
    args = parser.parse_args(argv)

    try:
        config = load_config(env_file=args.env_file)
    except ConfigError as e:
        print(f"regcache: {e}", file=sys.stderr)
        return 2
    return up(config, args.env_file)


if __name__ == "__main__":
    sys.exit(main())
