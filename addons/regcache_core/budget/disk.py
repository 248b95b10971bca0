"""Free space on a cache's disk, for /ready: a full disk makes registry:2 answer 500 to every
new image while it still answers /v2/, so its probe alone cannot tell."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..observe.stats import human_bytes
from . import report
OK = "ok"


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still write on the file system holding `path` (or the
    nearest folder above it that exists, for a cache that has stored nothing yet)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def disk_state(path: Path, min_free: int) -> str:
    """"ok", or why the disk under `path` cannot take more content."""
    free = free_bytes(path)
    if free == 0:
        return f"disk full ({path})"
    if free < min_free:
        return f"{human_bytes(free)} free on {path}, under REGCACHE_MIN_FREE_DISK ({human_bytes(min_free)})"
    return OK


class DiskWatch:
    """disk_state per cache, logging a warning when a cache's disk becomes short of space and
    a line when it recovers: one warning per episode, not one per request or probe."""

    def __init__(self, min_free: int) -> None:
        self.min_free = min_free
        self._last: dict[str, str] = {}
        self._lock = threading.Lock()  # /ready and the budget's runs check from their own threads

    def check(self, name: str, path: Path) -> str:
        state = disk_state(path, self.min_free)
        with self._lock:
            before = self._last.get(name, OK)
            self._last[name] = state
        if state != OK and before == OK:
            report(f"regcache: cache for {name}: {state}; it cannot store new content")
        elif state == OK and before != OK:
            report(f"regcache: cache for {name}: its disk has room again")
        return state
