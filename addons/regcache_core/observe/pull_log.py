"""The pull log: one JSON line per client request, for people, `jq` and later statistics.

Records hold only what the routing decision and the response say; no field ever carries a
header, so no credential can reach the log. The proxy and the data plane build them alike, from
plain values (`pull_record`); the data plane's reach the proxy as JSON (`to_json`, `from_json`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

DATAPLANE_BACKEND = "dataplane"  # the backend of records of blobs the data plane sent


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


FIELDS = {f.name: f.type for f in fields(PullRecord)}
_JSON_TYPES = {"str": (str,), "int": (int,), "str | None": (str, type(None))}


def pull_record(*, started: float, finished: float, client: str, registry: str | None, repository: str | None,
                kind: str | None, reference: str | None, method: str, status: int, sent: int, backend: str | None,
                cache: str | None = None, error: str | None = None) -> PullRecord:
    """The record of one client request that arrived at `started` and ended at `finished` (unix seconds)."""
    return PullRecord(
        time=utc_iso(started), client=client, registry=registry, repository=repository, kind=kind,
        reference=reference, method=method, status=status, bytes=sent,
        duration_ms=round((finished - started) * 1000), backend=backend, cache=cache, error=error,
    )


def to_json(record: PullRecord) -> str:
    return json.dumps(asdict(record), separators=(",", ":"))


def from_json(data: bytes | str) -> PullRecord | None:
    """The record `to_json` wrote; None for anything else."""
    try:
        values = json.loads(data)
    except ValueError:
        return None
    if not isinstance(values, dict) or values.keys() != FIELDS.keys():
        return None
    for name, annotation in FIELDS.items():
        if not isinstance(values[name], _JSON_TYPES[annotation]) or isinstance(values[name], bool):
            return None
    return PullRecord(**values)


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
        line = to_json(record)
        self._file.write(line + "\n")
        if self._also_stdout:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        self._file.close()
