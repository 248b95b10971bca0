"""TagStore (manifests/tags.py) on the shared Redis: a tag learnt or revalidated by one replica is
fresh on all of them.

Redis holds each registry's tags in a hash (`regcache:tags:<registry>`, field `<repository>:<tag>`,
neither of which can hold a colon): whether a tag is fresh is what Redis says. A replica keeps what
it read or wrote for LOCAL_FOR seconds and answers a fresh tag from that copy: a Redis call costs
the proxy about 0.14 ms of CPU, a tenth of a manifest request, and a hot tag is asked for many
times a second. So a tag moved by another replica is seen here within LOCAL_FOR seconds (within
REGCACHE_TAG_TTL anyway, on one node too).

What is learnt goes to this replica's own TagCache too (memory and disk), written through to
Redis in a task, one write at a time per tag so that they land in the order they were made.
While Redis is down that own store is the tag store (and a restart during an outage still
knows every tag this replica saw); when it is back, the next answer learnt writes through again.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import astuple

from ..manifests.tags import Key, TagCache, TagEntry
from .link import RedisLink, SharedStateDown

PREFIX = "regcache:tags:"
LOCAL_FOR = 1.0  # seconds a fresh tag read from Redis (or written) is answered without asking it again


def _field(repository: str, tag: str) -> str:
    return f"{repository}:{tag}"


def _encode(entry: TagEntry) -> str:
    return " ".join(map(str, astuple(entry)))  # no field holds a space: digest, media type, size, time


def _decode(value: bytes) -> TagEntry:
    digest, media_type, size, learnt = value.decode().split(" ")
    return TagEntry(digest, media_type, int(size), float(learnt))


class SharedTags:
    def __init__(self, link: RedisLink, own: TagCache, monotonic=time.monotonic) -> None:
        self.link = link
        self.own = own
        self._monotonic = monotonic
        self._copies: dict[Key, tuple[TagEntry, float]] = {}  # entry, when read from Redis or written
        self._writes: dict[Key, asyncio.Task] = {}  # the last write of each tag under way

    async def get(self, registry: str, repository: str, tag: str) -> TagEntry | None:
        key = (registry, repository, tag)
        now = self._monotonic()
        if (copy := self._copies.get(key)) is not None and now - copy[1] < LOCAL_FOR and self.is_fresh(copy[0]):
            return copy[0]
        try:
            value = await self.link.call(lambda r: r.hget(PREFIX + registry, _field(repository, tag)))
        except SharedStateDown:
            return await self.own.get(registry, repository, tag)
        if value is None:  # not in Redis (yet): what this replica knows, learnt before the cluster or while Redis was down
            return await self.own.get(registry, repository, tag)
        entry = _decode(value)
        self._copies[key] = (entry, now)
        return entry

    def is_fresh(self, entry: TagEntry) -> bool:
        return self.own.is_fresh(entry)

    def learn(self, registry: str, repository: str, tag: str, digest: str, media_type: str, size: int) -> TagEntry:
        return self._write((registry, repository, tag), self.own.learn(registry, repository, tag, digest, media_type, size))

    def refresh(self, registry: str, repository: str, tag: str, entry: TagEntry) -> TagEntry:
        return self._write((registry, repository, tag), self.own.refresh(registry, repository, tag, entry))

    async def flush(self) -> None:
        """Wait for the writes to Redis under way (and to this replica's own store)."""
        if self._writes:
            await asyncio.gather(*self._writes.values())
        await self.own.flush()

    def close(self) -> None:
        for write in self._writes.values():
            write.cancel()
        self.own.close()

    def _write(self, key: Key, entry: TagEntry) -> TagEntry:
        self._copies[key] = (entry, self._monotonic())
        write = asyncio.get_running_loop().create_task(self._send(key, entry, self._writes.get(key)))
        self._writes[key] = write
        write.add_done_callback(lambda _: self._writes.get(key) is write and self._writes.pop(key))
        return entry

    async def _send(self, key: Key, entry: TagEntry, before: asyncio.Task | None) -> None:
        if before is not None:
            await asyncio.wait([before])
        registry, repository, tag = key
        try:
            await self.link.call(lambda r: r.hset(PREFIX + registry, _field(repository, tag), _encode(entry)))
        except SharedStateDown:
            pass  # this replica's own store has it; Redis gets the next answer learnt
