"""Leases on cold blobs (cluster/blob_leases.py) and the cluster's single-flight on them
(cluster/blob_flights.py), against a real redis-server: one replica takes a blob's lease, renews
and publishes it, releases it; the others follow it; a dead leader's lease expires and another
replica takes over; with Redis down each replica downloads on its own."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import pytest

from regcache_core.cluster import link as link_module
from regcache_core.cluster.blob_flights import ClusterSpools, PeerSpool
from regcache_core.cluster.blob_leases import LEASE_TTL, BlobLeases, Leader
from regcache_core.cluster.lease import HeldLease
from regcache_core.cluster.link import RedisLink, SharedStateDown
from regcache_core.spool.blob_heads import BlobHead
from regcache_core.spool.table import Spool, State

KEY = ("docker.io", "library/app", "sha256:" + "ab" * 32)


def test_one_replica_takes_the_lease_the_others_see_where_it_publishes(redis_server):
    async def main():
        a_link, b_link = RedisLink(redis_server.url, 0.5), RedisLink(redis_server.url, 0.5)
        a, b = BlobLeases(a_link, "http://10.0.0.1:5050"), BlobLeases(b_link, "http://10.0.0.2:5050")
        lease = await a.take(KEY)
        assert isinstance(lease, HeldLease)
        seen = await b.take(KEY)
        assert seen == Leader(a.me.owner, "http://10.0.0.1:5050") and seen.size is None and not b.mine(seen)
        assert await a.publish(lease, 1234, "application/vnd.oci.image.layer.v1.tar+gzip")
        seen = await b.take(KEY)
        assert (seen.dataplane, seen.size, seen.content_type) == ("http://10.0.0.1:5050", 1234,
                                                                  "application/vnd.oci.image.layer.v1.tar+gzip")
        assert (await b.known_head(KEY))[0] == seen
        assert await lease.renew()
        await lease.release()
        assert await b.leader(KEY) is None
        assert isinstance(await b.take(KEY), HeldLease)  # free again: the next one takes it
        await a_link.close()
        await b_link.close()

    asyncio.run(main())


def test_a_dead_leaders_lease_expires_and_another_takes_over(redis_server):
    async def main():
        a_link, b_link = RedisLink(redis_server.url, 0.5), RedisLink(redis_server.url, 0.5)
        a, b = BlobLeases(a_link, "http://a:5050", ttl=0.3), BlobLeases(b_link, "http://b:5050", ttl=0.3)
        dead = await a.take(KEY)
        assert isinstance(dead, HeldLease)
        assert isinstance(await b.take(KEY), Leader)
        await asyncio.sleep(0.5)  # a renews no more: SIGKILLed
        successor = await b.take(KEY)
        assert isinstance(successor, HeldLease)
        # The old leader, back, cannot renew, publish or release its successor's lease.
        assert not await dead.renew()
        assert not await a.publish(dead, 10, "x")
        await dead.release()
        assert (await a.leader(KEY)).dataplane == "http://b:5050"
        await a_link.close()
        await b_link.close()

    asyncio.run(main())


def test_renewal_keeps_the_lease_past_its_expiry(redis_server):
    async def main():
        link = RedisLink(redis_server.url, 0.5)
        a, b = BlobLeases(link, "http://a:5050", ttl=0.3), BlobLeases(link, "http://b:5050", ttl=0.3)
        lease = await a.take(KEY)
        for _ in range(6):
            await asyncio.sleep(0.1)
            assert await lease.renew()
        assert isinstance(await b.take(KEY), Leader)  # 0.6 s after: still a's
        await link.close()

    asyncio.run(main())


def test_shared_head_answers_every_replica(redis_server):
    async def main():
        link = RedisLink(redis_server.url, 0.5)
        a, b = BlobLeases(link, "http://a:5050"), BlobLeases(link, "http://b:5050")
        await a.share_head(KEY, BlobHead(KEY[2], 99, "application/octet-stream"), 5)
        assert await b.known_head(KEY) == (None, BlobHead(KEY[2], 99, "application/octet-stream"))
        await link.close()

    asyncio.run(main())


# The cluster's single-flight, on fake local spools: what a request gets on each replica.

class FakeDownloads:
    """SpoolDownloads' part ClusterSpools uses: the table, the upstream state, and claim."""

    def __init__(self) -> None:
        self.spools: dict = {}
        self.table = SimpleNamespace(get=self.spools.get)
        self.upstream = SimpleNamespace(state=SimpleNamespace(reason_down=lambda name: None))
        self.claimed: list = []

    def claim(self, registry, key) -> Spool:
        spool = self.spools.get(key)
        if spool is None:
            spool = self.spools[key] = Spool(key, None)
            self.claimed.append(key)
        return spool


class FakeSpools:
    def __init__(self) -> None:
        self.downloads = FakeDownloads()

    async def follow(self, registry, repository, digest):
        return self.downloads.claim(registry, (registry.name, repository, digest))

    async def close(self) -> None:
        pass


REGISTRY = SimpleNamespace(name=KEY[0])


def spooling(spool: Spool, size: int) -> None:
    """What the download does once the upstream's 200 came."""
    spool.size, spool.state = size, State.SPOOLING
    spool.decided.set()


@contextlib.asynccontextmanager
async def two_replicas(redis_url: str, redis_timeout: float = 0.5, ttl: float = LEASE_TTL, renew_every: float = 0.05):
    """Replicas a and b on fake local spools (`a.local`, `b.local`), each with a Redis link of its
    own; a's data plane is a port that accepts connections (`a_url`, `server`), b's is nowhere."""
    server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
    a_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    links = [RedisLink(redis_url, redis_timeout) for _ in range(2)]
    a = ClusterSpools(FakeSpools(), BlobLeases(links[0], a_url, ttl=ttl), renew_every=renew_every)
    b = ClusterSpools(FakeSpools(), BlobLeases(links[1], "http://b:5050", ttl=ttl), renew_every=renew_every)
    try:
        yield SimpleNamespace(a=a, b=b, a_url=a_url, server=server, links=links)
    finally:
        await a.close()
        await b.close()
        server.close()
        for link in links:
            await link.close()


def test_cluster_spools_one_download_for_two_replicas_then_takeover(redis_server):
    async def main():
        async with two_replicas(redis_server.url, ttl=0.4, renew_every=0.1) as bed:
            a, b = bed.a, bed.b
            spool = await a.follow(REGISTRY, KEY[1], KEY[2])
            assert isinstance(spool, Spool) and a.local.downloads.claimed == [KEY]
            following = asyncio.ensure_future(b.follow(REGISTRY, KEY[1], KEY[2]))
            await asyncio.sleep(0.2)
            assert not following.done()  # b waits for a's size
            spooling(spool, 4096)
            peer = await asyncio.wait_for(following, 5)
            assert peer == PeerSpool(KEY, 4096, "application/octet-stream", bed.a_url)
            assert b.local.downloads.claimed == []
            # b's HEAD is answered from what a published, without the upstream.
            assert await b.head(KEY) == (BlobHead(KEY[2], 4096, "application/octet-stream"), False)
            await asyncio.sleep(0.6)  # a renews past the lease's expiry
            assert await b.follow(REGISTRY, KEY[1], KEY[2]) == peer
            # a dies: it renews no more, its lease expires, and b's next request takes it over.
            for task in a.tasks:
                task.cancel()
            await asyncio.sleep(0.6)
            assert isinstance(await b.follow(REGISTRY, KEY[1], KEY[2]), Spool)
            assert b.local.downloads.claimed == [KEY]

    asyncio.run(main())


def test_cluster_spools_release_when_the_spool_goes(redis_server):
    async def main():
        async with two_replicas(redis_server.url) as bed:
            spool = await bed.a.follow(REGISTRY, KEY[1], KEY[2])
            spool.state = State.GONE  # declined: no 200 from the upstream
            spool.decided.set()
            del bed.a.local.downloads.spools[KEY]
            await asyncio.wait_for(asyncio.gather(*bed.a.tasks), 5)
            assert await bed.a.leases.leader(KEY) is None
            assert isinstance(await bed.b.follow(REGISTRY, KEY[1], KEY[2]), Spool)  # b tries itself

    asyncio.run(main())


def test_cluster_spools_redis_down_each_replica_on_its_own_then_back(redis_server, monkeypatch):
    monkeypatch.setattr(link_module, "PROBE_INTERVAL", 0.05)

    async def main():
        async with two_replicas(redis_server.url, redis_timeout=0.3) as bed:
            a, b = bed.a, bed.b
            redis_server.pause()
            assert isinstance(await a.follow(REGISTRY, KEY[1], KEY[2]), Spool)
            assert isinstance(await b.follow(REGISTRY, KEY[1], KEY[2]), Spool)  # no pull waits on Redis
            assert a.local.downloads.claimed == b.local.downloads.claimed == [KEY]
            with pytest.raises(SharedStateDown):
                await bed.links[0].call(lambda r: r.ping())
            redis_server.resume()
            for _ in range(100):
                if all(link.up for link in bed.links):
                    break
                await asyncio.sleep(0.05)
            other = (KEY[0], KEY[1], "sha256:" + "cd" * 32)
            spooling(await a.follow(REGISTRY, other[1], other[2]), 10)
            assert await asyncio.wait_for(b.follow(REGISTRY, other[1], other[2]), 5) == PeerSpool(
                other, 10, "application/octet-stream", bed.a_url)  # cluster-wide again

    asyncio.run(main())


def test_cluster_spools_take_over_from_a_leader_whose_data_plane_is_gone(redis_server):
    """A replica SIGKILLed keeps its leases until they expire; its data plane refuses connections
    at once, so the next request takes the blob over instead of sending a client there."""
    async def main():
        async with two_replicas(redis_server.url) as bed:
            a, b = bed.a, bed.b
            spooling(await a.follow(REGISTRY, KEY[1], KEY[2]), 10)
            assert await asyncio.wait_for(b.follow(REGISTRY, KEY[1], KEY[2]), 5) == PeerSpool(
                KEY, 10, "application/octet-stream", bed.a_url)
            for task in a.tasks:  # a dies: no more renewals, and nothing listens on its data plane
                task.cancel()
            bed.server.close()
            await bed.server.wait_closed()
            await asyncio.sleep(1.1)  # past REACHABLE_FOR: b looks again
            assert isinstance(await asyncio.wait_for(b.follow(REGISTRY, KEY[1], KEY[2]), 5), Spool)
            assert b.local.downloads.claimed == [KEY]
            assert (await b.leases.leader(KEY)).dataplane == "http://b:5050"

    asyncio.run(main())


def test_cluster_spools_requests_on_the_leader_meanwhile_follow_its_spool(redis_server):
    """Requests on one replica that ask Redis while the first one takes the lease find that one's
    spool (they must not wait for a lease this replica holds)."""
    async def main():
        async with two_replicas(redis_server.url) as bed:
            spools = await asyncio.wait_for(asyncio.gather(*(bed.a.follow(REGISTRY, KEY[1], KEY[2])
                                                             for _ in range(8))), 5)
            assert all(spool is spools[0] and isinstance(spool, Spool) for spool in spools)
            assert bed.a.local.downloads.claimed == [KEY]

    asyncio.run(main())
