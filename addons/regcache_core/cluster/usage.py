"""The usage records (budget/usage.py) of the whole cluster, in Redis: when clients last pulled
each blob and manifest through any replica, so that the disk budget evicts what the cluster
pulled least recently, and `regcache cache ls` says when a tag was last pulled anywhere.

Per registry, two sorted sets scored by the time of the last pull: `regcache:usage:<registry>:blobs`
(blob digest) and `regcache:usage:<registry>:manifests` ("<repository> <tag or digest>"). A
score only moves forward (ZADD GT), whichever replica's record lands last.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from .link import RedisLink

PREFIX = "regcache:usage:"
EVICTION = "evict"  # the lease on a disk-budget run: one replica at a time evicts from the shared storage


def _key(registry: str, kind: str) -> str:
    return f"{PREFIX}{registry}:{kind}s"


class SharedUsage:
    def __init__(self, link: RedisLink) -> None:
        self.link = link

    async def record(self, uses: Iterable[tuple[str, str, str, str, float]]) -> None:
        """Uses as (registry, repository, reference, kind, used), in one round trip. Raises SharedStateDown."""
        async def send(r) -> None:
            async with r.pipeline(transaction=False) as pipe:
                for registry, repository, reference, kind, used in uses:
                    member = reference if kind == "blob" else f"{repository} {reference}"
                    pipe.zadd(_key(registry, kind), {member: used}, gt=True)
                await pipe.execute()

        await self.link.call(send)

    async def blob_last_use(self, registry: str) -> dict[str, float]:
        """digest -> last pull of it from any repository of `registry`, on any replica."""
        members = await self.link.call(lambda r: r.zrange(_key(registry, "blob"), 0, -1, withscores=True))
        return {digest.decode(): used for digest, used in members}

    async def last_pulls(self, registry: str) -> dict[tuple[str, str], float]:
        """(repository, tag or manifest digest) -> last pull, for the manifests of `registry`."""
        members = await self.link.call(lambda r: r.zrange(_key(registry, "manifest"), 0, -1, withscores=True))
        return {tuple(member.decode().split(" ", 1)): used for member, used in members}


def read_last_pulls(url: str, timeout: float, registries: list[str]) -> dict[str, dict[tuple[str, str], float]]:
    """For `regcache cache ls` (no event loop of its own): each registry's last pulls. Raises SharedStateDown."""
    async def read() -> dict[str, dict[tuple[str, str], float]]:
        link = RedisLink(url, timeout)
        try:
            usage = SharedUsage(link)
            return {registry: await usage.last_pulls(registry) for registry in registries}
        finally:
            await link.close()

    return asyncio.run(read())
