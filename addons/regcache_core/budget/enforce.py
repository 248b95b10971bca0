"""One run of the disk budget over the caches run here: scan each cache's storage, choose and
evict, and say what was done. Blocking file I/O: callers run it off any event loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..observe.stats import human_bytes
from .eviction import CacheDisk, Evicted, apply, choose
from .storage import Tree, scan
from .usage import UsageRecords


@dataclass(frozen=True)
class CacheBudget:
    registry: str  # its name, e.g. docker.io
    storage: Path | Tree  # registry:2's rootdirectory: a directory, or an object store's (objectstore/tree.py)
    budget: int | None  # K_MAX_DISK


@dataclass(frozen=True)
class CacheResult:
    registry: str
    evicted: Evicted
    used: int  # bytes its storage holds after the run
    budget: int | None
    skipped: int  # blobs due for eviction that a pull was reading: left for a later run


def enforce(caches: list[CacheBudget], total_budget: int | None, usage: UsageRecords,
            busy: Callable[[str, str], bool]) -> list[CacheResult]:
    disks = [CacheDisk(c.registry, scan(c.storage), c.budget, usage.blob_last_use(c.registry)) for c in caches]
    choose(disks, total_budget, busy)
    results = []
    for disk in disks:
        evicted = apply(disk, busy) if disk.evict else Evicted(0, 0)
        results.append(CacheResult(disk.registry, evicted, disk.storage.total - evicted.bytes, disk.budget,
                                   len(disk.skipped)))
    return results


def summary(results: list[CacheResult], total_budget: int | None) -> str | None:
    """The run's log line, or None when it evicted nothing."""
    if not any(r.evicted.blobs for r in results):
        return None
    parts = [f"{r.registry}: {r.evicted.blobs} blobs, {human_bytes(r.evicted.bytes)}, now {human_bytes(r.used)}"
             + (f" of {human_bytes(r.budget)}" if r.budget else "")
             + (f", {r.skipped} being read left for a later run" if r.skipped else "")
             for r in results if r.evicted.blobs]
    total = sum(r.used for r in results)
    limit = f" of REGCACHE_MAX_DISK {human_bytes(total_budget)}" if total_budget else ""
    return f"regcache: disk budget: evicted {'; '.join(parts)} (all caches {human_bytes(total)}{limit})"
