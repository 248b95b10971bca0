"""The tag cache: (registry, repository, tag) -> the digest it named, with its media type and size.

A tag is what every pull starts with, and the only mutable name in a registry. While an entry
is fresh (younger than REGCACHE_TAG_TTL), regcache answers the tag without asking upstream;
once stale, a HEAD upstream revalidates it (manifest_front.py). Entries are learnt from the
answers clients get, kept in memory for lookups and in a diskcache store under the data folder,
so a restart (during an outage, say) still knows every tag pulled before. Disk reads and
writes run in a thread, never on the proxy's event loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import diskcache

Key = tuple[str, str, str]  # registry name, repository, tag


@dataclass(frozen=True)
class TagEntry:
    digest: str
    media_type: str
    size: int
    learnt: float  # wall-clock time (time.time()), so that age survives a restart


class TagCache:
    def __init__(self, directory: Path, ttl: float, clock=time.time) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ttl = ttl
        self._clock = clock
        self._disk = diskcache.Cache(str(directory))
        self._memory: dict[Key, TagEntry] = {}
        self._writes: set[asyncio.Future] = set()

    async def get(self, registry: str, repository: str, tag: str) -> TagEntry | None:
        key = (registry, repository, tag)
        if (entry := self._memory.get(key)) is None:
            stored = await asyncio.to_thread(self._disk.get, key)
            if stored is not None:
                # Stored as a plain tuple: a pickled class would tie the file to this code's layout.
                entry = self._memory[key] = TagEntry(*stored)
        return entry

    def is_fresh(self, entry: TagEntry) -> bool:
        return 0 <= self._clock() - entry.learnt < self.ttl

    def learn(self, registry: str, repository: str, tag: str, digest: str, media_type: str, size: int) -> TagEntry:
        entry = TagEntry(digest, media_type, size, self._clock())
        self._store((registry, repository, tag), entry)
        return entry

    def refresh(self, registry: str, repository: str, tag: str, entry: TagEntry) -> TagEntry:
        """The upstream still names `entry`'s digest: fresh again from now."""
        entry = replace(entry, learnt=self._clock())
        self._store((registry, repository, tag), entry)
        return entry

    async def flush(self) -> None:
        """Wait for the disk writes under way (tests, shutdown)."""
        if self._writes:
            await asyncio.gather(*self._writes)

    def close(self) -> None:
        self._disk.close()

    def _store(self, key: Key, entry: TagEntry) -> None:
        self._memory[key] = entry
        write = asyncio.get_running_loop().run_in_executor(None, self._disk.set, key, astuple(entry))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
