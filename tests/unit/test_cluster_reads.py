"""Reads in flight of the whole cluster (cluster/reads.py), against a real redis-server: a send
registered by one process is seen by another's budget while it lasts, and no longer once it
ended; a reader that dies (renews no more) is counted no more past its deadline; Redis down,
sends go on unregistered."""

from __future__ import annotations

import asyncio

import pytest

from regcache_core.cluster.link import RedisLink
from regcache_core.cluster.reads import ClusterReads, reads_key
from tests.support.redis_server import RedisServer

BLOB = ("docker.io", "sha256:" + "cd" * 32)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_a_send_is_seen_by_every_replica_while_it_lasts(redis_server):
    async def main():
        a_link, b_link = RedisLink(redis_server.url, 0.5), RedisLink(redis_server.url, 0.5)
        a, b = ClusterReads(a_link, ttl=0.6, renew_every=0.1), ClusterReads(b_link)
        seen = []
        async with a.read(*BLOB):
            async with a.read(*BLOB):  # a second send of the same blob by the same process
                seen.append(await b.read_anywhere(*BLOB))
            await asyncio.sleep(1.0)  # renewed past its TTL
            seen.append(await b.read_anywhere(*BLOB))
        await asyncio.sleep(0.1)  # the end is told in a task of its own
        seen.append(await b.read_anywhere(*BLOB))
        a.close()
        await a_link.close()
        await b_link.close()
        return seen

    assert asyncio.run(main()) == [True, True, False]


def test_a_send_that_ends_and_starts_again_stays_registered(redis_server):
    async def main():
        link = RedisLink(redis_server.url, 0.5)
        a, b = ClusterReads(link), ClusterReads(link)
        a.started(*BLOB)
        a.ended(BLOB)
        a.started(*BLOB)  # the three writes are on their way, in this order
        await asyncio.sleep(0.2)
        seen = await b.read_anywhere(*BLOB)
        a.close()
        await link.close()
        return seen

    assert asyncio.run(main())


def test_a_dead_readers_send_expires_by_itself(redis_server):
    async def main():
        link = RedisLink(redis_server.url, 0.5)
        dying, other = ClusterReads(link, ttl=0.4, renew_every=0.1), ClusterReads(link)
        dying.started(*BLOB)
        await asyncio.sleep(0.2)
        before = await other.read_anywhere(*BLOB)
        dying.close()  # SIGKILLed: no renewal, no end
        await asyncio.sleep(0.6)
        after = await other.read_anywhere(*BLOB)
        ttl = await link.call(lambda r: r.pttl(reads_key(BLOB)))
        await link.close()
        return before, after, ttl

    before, after, ttl = asyncio.run(main())
    assert (before, after, ttl) == (True, False, -2)  # -2: the key is gone


def test_redis_down_sends_go_on_unregistered(redis_server):
    async def main():
        link = RedisLink(redis_server.url, 0.3)
        reads = ClusterReads(link)
        redis_server.stop()
        sent = False
        async with reads.read(*BLOB):
            sent = True
        reads.close()
        await link.close()
        return sent, link.up

    assert asyncio.run(main()) == (True, False)
