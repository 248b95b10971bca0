"""The pull log: one JSON line per client request, for people, `jq` and later statistics.

Records hold only what the routing decision and the response say; no field ever carries a
header, so no credential can reach the log.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO


@dataclass(frozen=True)
class PullRecord:
    time: str  # ISO 8601, UTC, when the request arrived
    client: str  # client IP address
    registry: str | None  # None when the request named no registry we map
    repository: str | None
    kind: str | None  # ping | manifest | blob | tags | referrers; None for refused requests
    reference: str | None  # tag or digest
    method: str
    status: int  # status sent to the client; 0 if none was sent
    bytes: int  # body bytes sent to the client
    duration_ms: int
    backend: str | None  # base URL the request went to; None if we answered it ourselves
    # For cached registries' manifests and blobs: "hit" (served from the cache), "miss" (content
    # fetched upstream for this request) or "stale" (served from the cache because the upstream
    # failed); else None
    cache: str | None = None
    error: str | None = None  # why the exchange failed, when it did


def utc_iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


class PullLog:
    """Appends records to a file (created with its folder) and, optionally, to stdout."""

    def __init__(self, path: Path, also_stdout: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered: each record reaches the file whole, at once, and appending one short
        # line is cheap enough to do on the proxy's event loop.
        self._file: TextIO = open(path, "a", buffering=1, encoding="utf-8")
        self._also_stdout = also_stdout

    def write(self, record: PullRecord) -> None:
        line = json.dumps(asdict(record), separators=(",", ":"))
        self._file.write(line + "\n")
        if self._also_stdout:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        self._file.close()
