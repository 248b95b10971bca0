"""Partial uploads registry:2 left in a cache on an object store, removed once old.

registry:2 writes every blob it stores through an upload,
`docker/registry/v2/repositories/<name>/_uploads/<uuid>/` (`startedat`, then `data` and
`hashstates/...`), and removes the folder when the blob is committed. A write cut short leaves the
folder. On a filesystem registry:2's own purger removes it (stack/caches.py); on an object store
that purger is off (2.8's panics on a store that lists emptied folders), so this sweep does it:
once at start and every SWEEP_EVERY, a folder whose newest sign of life is older than MAX_AGE
goes. A pull-through cache's uploads last seconds to minutes (registry:2 stores a blob from the
local spool, once complete), so an upload being written is never that old: its age counts from
the newest object in its folder, and from the time its `startedat` holds.

Deleting what is gone already is no error: replicas on one bucket each sweep it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime

from .storage import Tree

MAX_AGE = 6 * 3600.0  # seconds: hours past any real upload's life, the largest blob on a slow store included
SWEEP_EVERY = 3600.0  # seconds between sweeps
REPOSITORIES = "docker/registry/v2/repositories/"
# An upload's folder and a path in it; an empty one: an emptied folder a store lists (SeaweedFS).
_UPLOAD_FILE = re.compile(r"(docker/registry/v2/repositories/.+?/_uploads/[^/]+)/(.*)")
MAX_STARTEDAT = 64  # bytes: registry:2 writes one RFC 3339 time


def last_signs_of_life(files: Iterable[tuple[str, int, float]]) -> dict[str, dict[str, float]]:
    """Upload folder -> {path in it: modification time} of the listed files of every upload."""
    uploads: dict[str, dict[str, float]] = {}
    for path, _, mtime in files:
        if match := _UPLOAD_FILE.fullmatch(path):
            uploads.setdefault(match[1], {})[match[2]] = mtime
    return uploads


def started_at(content: bytes | None) -> float | None:
    """The time a `startedat` file holds (registry:2 writes it as the upload begins: its clock,
    this machine's, where the store's modification times are the store's); None when unreadable."""
    try:
        return datetime.fromisoformat((content or b"").decode().strip()).timestamp()
    except (UnicodeDecodeError, ValueError):
        return None


def age(files: dict[str, float], started: float | None, now: float) -> float:
    """Seconds since an upload's newest sign of life: its files' modification times, `startedat`'s
    replaced by the time it holds (`started`) when it holds one."""
    times = [mtime for path, mtime in files.items() if path != "startedat" or started is None]
    return now - max([*times, *([started] if started is not None else [])])


def sweep(tree: Tree, now: float, max_age: float = MAX_AGE) -> list[str]:
    """Remove the upload folders of `tree` older than `max_age`; returns them. Blocking."""
    removed = []
    for folder, files in last_signs_of_life(tree.files(REPOSITORIES)).items():
        if any(now - mtime < max_age for path, mtime in files.items() if path != "startedat"):
            continue  # written lately: `startedat` need not be read
        started = started_at(tree.read(f"{folder}/startedat", MAX_STARTEDAT)) if "startedat" in files else None
        if age(files, started, now) >= max_age:
            tree.remove(folder)
            removed.append(folder)
    return removed
