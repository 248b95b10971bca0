"""When clients last pulled each piece of content, per (registry, repository, reference): what
eviction ranks blobs by and `regcache cache ls` shows. A small SQLite file under the data dir,
so it survives restarts; writers and readers in other processes (the CLI) share it safely."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

SCHEMA = """
CREATE TABLE IF NOT EXISTS last_use (
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    reference TEXT NOT NULL,  -- a blob or manifest digest, or a tag
    kind TEXT NOT NULL,  -- blob | manifest
    used REAL NOT NULL,  -- Unix time of the last pull
    PRIMARY KEY (registry, repository, reference)
)
"""


class UsageRecords(Protocol):
    """What eviction ranks blobs by: UsageStore's, or with replicas the cluster's (cluster/usage.py)."""

    def blob_last_use(self, registry: str) -> dict[str, float]: ...


def usage_file(data_dir: Path) -> Path:
    return data_dir / "usage.sqlite"


class UsageStore:
    """One connection, for the thread that made it (sqlite3's rule)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        self.db.execute(SCHEMA)

    def record(self, uses: Iterable[tuple[str, str, str, str, float]]) -> None:
        """Uses as (registry, repository, reference, kind, used), in one transaction: a commit
        costs a disk sync, too dear for every manifest a busy proxy answers."""
        with self.db:
            self.db.executemany(
                "INSERT INTO last_use VALUES (?, ?, ?, ?, ?) ON CONFLICT (registry, repository, reference) DO UPDATE SET used = max(used, excluded.used)",
                uses)

    def blob_last_use(self, registry: str) -> dict[str, float]:
        """digest -> last pull of it from any repository of `registry`."""
        rows = self.db.execute(
            "SELECT reference, max(used) FROM last_use WHERE registry = ? AND kind = 'blob' GROUP BY reference",
            (registry,))
        return dict(rows)

    def last_pulls(self, registry: str) -> dict[tuple[str, str], float]:
        """(repository, tag or manifest digest) -> last pull, for the manifests of `registry`."""
        rows = self.db.execute(
            "SELECT repository, reference, used FROM last_use WHERE registry = ? AND kind = 'manifest'", (registry,))
        return {(repository, reference): used for repository, reference, used in rows}

    def close(self) -> None:
        self.db.close()
