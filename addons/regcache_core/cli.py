"""The `regcache` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn
from rich.progress import Progress as Bars
from rich.table import Table

from .budget.inventory import disk_usage, format_du, format_ls, holdings
from .commands.client_config import Credentials, client_files, parse_endpoint, write_client_files
from .commands.config_docs import CONFIGURATION_DOC
from .commands.config_docs import config_docs as write_config_docs
from .config import Config, ConfigError, load_config
from .stack.launcher import up
from .commands.prefetch import PrefetchError, Progress, parse_platforms, parse_reference, prefetch_all
from .observe.stats import format_table, human_bytes, summarize


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
    cache_command = commands.add_parser("cache", help="what the caches run here hold: du (bytes, budget, free disk), ls (tags)")
    cache_command.add_argument("what", choices=("du", "ls"),
                               help="du: bytes per registry and repository, budget, free disk; ls: repositories and tags held, last pulled")
    cache_command.add_argument("--json", action="store_true", help="print JSON for machines instead of a table")
    prefetch_command = commands.add_parser("prefetch", help="warm the caches with images, through the running stack")
    prefetch_command.add_argument("images", nargs="*", help="image references, e.g. docker.io/library/nginx:1.27 or ghcr.io/org/app@sha256:...")
    prefetch_command.add_argument("--file", type=Path, help="a file of image references, one per line (# starts a comment)")
    prefetch_command.add_argument("--platform", help="only these platforms of multi-platform images, e.g. linux/amd64,linux/arm64 (default: all)")
    prefetch_command.add_argument("--jobs", type=int, default=4, help="images fetched at once (default: 4)")
    client_config = commands.add_parser(
        "client-config", parents=[env_file_option], help="write the client files: registries.yaml, certs.d/*/hosts.toml, daemon.json, registries.conf"
    )
    client_config.add_argument("--out", required=True, type=Path, help="directory to write them into")
    client_config.add_argument(
        "--endpoint",
        help="one URL for containerd/k3s, e.g. http://10.0.0.5:5000 (it names the registry in ?ns=); "
        "default: a virtual host per registry, http://<registry>.<REGISTRY_DOMAIN>:<port>",
    )
    config_docs_command = commands.add_parser(
        "config-docs", help="write .env.example and the settings tables of docs/configuration.md from the settings config.py declares"
    )
    config_docs_command.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each file that is out of date")
    config_docs_command.add_argument("--root", type=Path, default=Path("."), help="the repository's directory (default: here)")
    client_config.add_argument("--username", help="an account of REGCACHE_HTPASSWD: the files then carry its credentials")
    client_config.add_argument("--password-stdin", action="store_true", help="read that account's password from standard input")
    args = parser.parse_args(argv)
    if args.env_file and not Path(args.env_file).is_file():
        print(f"regcache: --env-file: {args.env_file} is not a file", file=sys.stderr)
        return 2
    env_file = args.env_file or ".env"

    if args.command == "config-docs":
        return config_docs(args.root, args.check)
    if args.command == "stats" and args.pull_log is not None:
        return stats(args.pull_log, args.json, args.top)
    try:
        config = load_config(env_file=env_file)
        if args.command != "up":  # under `regcache up` the proxy logs them, once
            for warning in config.warnings:
                print(f"regcache: {warning}", file=sys.stderr)
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
    if args.command == "cache":
        return cache(config, args.what, args.json)
    if args.command == "prefetch":
        return prefetch(config, args.images, args.file, args.platform, args.jobs)
    return up(config, env_file, web=args.web)


def config_docs(root: Path, check: bool) -> int:
    try:
        stale = write_config_docs(root, check)
    except OSError as e:
        print(f"regcache config-docs: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:  # the document lost its markers
        print(f"regcache config-docs: {root / CONFIGURATION_DOC}: {e}", file=sys.stderr)
        return 2
    for path in stale:
        print(f"{path}: out of date; `regcache config-docs` writes it" if check else f"{path}: written")
    return 1 if check and stale else 0


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


def cache(config: Config, what: str, as_json: bool) -> int:
    document = disk_usage(config) if what == "du" else holdings(config)
    if as_json:
        print(json.dumps(document, indent=2))
    else:
        print(format_du(document) if what == "du" else format_ls(document))
    return 0


def prefetch(config: Config, references: list[str], file: Path | None, platform: str | None, jobs: int) -> int:
    if jobs < 1:
        print("regcache prefetch: --jobs must be at least 1", file=sys.stderr)
        return 2
    try:
        if file is not None:
            lines = file.read_text(encoding="utf-8").splitlines()
            references = [*references, *(line.split("#", 1)[0].strip() for line in lines)]
        images = list(dict.fromkeys(parse_reference(r) for r in references if r.strip()))
        platforms = parse_platforms(platform)
    except OSError as e:
        print(f"regcache prefetch: cannot read {file}: {e.strerror}", file=sys.stderr)
        return 2
    except PrefetchError as e:
        print(f"regcache prefetch: {e}", file=sys.stderr)
        return 2
    if not images:
        print("regcache prefetch: no images given (arguments or --file)", file=sys.stderr)
        return 2
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Bars(*columns, console=Console(stderr=True)) as bars:
        overall = bars.add_task("all images", total=0)
        bar = {image: bars.add_task(str(image), total=None) for image in images}

        def sized(image, total: int) -> None:
            bars.update(bar[image], total=total)
            bars.update(overall, total=bars.tasks[overall].total + total)

        def advanced(image, count: int) -> None:
            bars.advance(bar[image], count)
            bars.advance(overall, count)

        results = asyncio.run(prefetch_all(config, images, platforms, jobs, Progress(sized, advanced)))
    table = Table("image", "platforms", "blobs", "bytes", "result")
    for r in results:
        table.add_row(str(r.image), ", ".join(r.platforms) or "-", str(r.blobs), human_bytes(r.bytes),
                      f"failed: {r.error}" if r.error else "ok")
    Console().print(table)
    if failed := [r for r in results if r.error]:
        print(f"regcache prefetch: {len(failed)} failed: " + "; ".join(f"{r.image}: {r.error}" for r in failed), file=sys.stderr)
        return 1
    return 0


def write_client_config(config: Config, out: Path, endpoint: str | None, credentials: Credentials | None) -> int:
    try:
        written = write_client_files(out, client_files(config, endpoint, credentials), private=credentials is not None)
    except OSError as e:
        print(f"regcache client-config: --out {out}: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    for path in written:
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
