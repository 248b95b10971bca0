"""`python -m regcache_core.dataplane [--env-file FILE] [--ready-fd N]`: run the data plane's
workers (what `regcache up` starts after the proxy). With --ready-fd, "ready" is written to
that file descriptor (and it is closed) once every worker serves."""

from __future__ import annotations

import argparse
import os
import sys

from ..config import ConfigError, load_config
from .workers import configure_logging, run_workers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regcache_core.dataplane", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-file", default=".env", help="settings file (default: .env)")
    parser.add_argument("--ready-fd", type=int, help="file descriptor to write 'ready' to once every worker serves")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = load_config(env_file=args.env_file)
    except ConfigError as e:
        print(f"regcache: {e}", file=sys.stderr, flush=True)
        return 1
    if config.dataplane is None:
        print("regcache: REGCACHE_DATAPLANE is false: no data plane to run", file=sys.stderr, flush=True)
        return 1
    return run_workers(config, lambda: report_ready(args.ready_fd))


def report_ready(fd: int | None) -> None:
    if fd is not None:
        with os.fdopen(fd, "w") as ready:
            ready.write("ready\n")


if __name__ == "__main__":
    sys.exit(main())
