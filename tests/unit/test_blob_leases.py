"""Leases on cold blobs (cluster/blob_leases.py) and the cluster's single-flight on them
(cluster/blob_flights.py), against a real redis-server: one replica takes a blob's lease, renews
and publishes it, releases it; the others follow it; a dead leader's lease expires and another
replica takes over; with Redis down each replica downloads on its own."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from regcache_core.cluster import link as link_module
from regcache_core.cluster.blob_flights import ClusterSpools, PeerSpool
from regcache_core.cluster.blob_leases import BlobLeases, Lease, Leader
from regcache_core.cluster.link import RedisLink, SharedStateDown
from regcache_core.spool.blob_heads import BlobHead
from regcache_core.spool.table import Spool, State
from tests.support.redis_server import RedisServer

KEY = ("docker.io", "library/app", "sha256:" + "ab" * 32)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_one_replica_takes_the_lease_the_others_see_where_it_publishes(redis_server):
    async def main():
        a_link, b_link = RedisLink(redis_server.url, 0.5), RedisLink(redis_server.url, 0.5)
        a, b = BlobLeases(a_link, "http://10.0.0.1:5050"), BlobLeases(b_link, "http://10.0.0.2:5050")
        lease = await a.take(KEY)
        assert isinstance(lease, Lease)
        seen = await b.take(KEY)
        assert seen == Leader(a.me.owner, "http://10.0.0.1:5050") and seen.size is None and not b.mine(seen)
        assert await a.publish(lease, 1234, "application/vnd.oci.image.layer.v1.tar+gzip")
        seen = await b.take(KEY)
        assert (seen.dataplane, seen.size, seen.content_type) == ("http://10.0.0.1:5050", 1234,
                                                                  "application/vnd.oci.image.layer.v1.tar+gzip")
        assert (await b.known_head(KEY))[0] == seen
        assert await a.renew(lease)
        await a.release(lease)
        assert await b.leader(KEY) is None
        assert isinstance(await b.take(KEY), Lease)  # free again: the next one takes it
        await a_link.close()
        await b_link.close()

    asyncio.run(main())


def test_a_dead_leaders_lease_expires_and_another_takes_over(redis_server):
    async def main():
        a_link, b_link = RedisLink(redis_server.url, 0.5), RedisLink(redis_server.url, 0.5)
        a, b = BlobLeases(a_link, "http://a:5050", ttl=0.3), BlobLeases(b_link, "http://b:5050", ttl=0.3)
        dead = await a.take(KEY)
        assert isinstance(dead, Lease)
        assert isinstance(await b.take(KEY), Leader)
        await asyncio.sleep(0.5)  # a renews no more: SIGKILLed
        successor = await b.take(KEY)
        assert isinstance(successor, Lease)
        # The old leader, back, cannot renew, publish or release its successor's lease.
        assert not await a.renew(dead)
        assert not await a.publish(dead, 10, "x")
        await a.release(dead)
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
            assert await a.renew(lease)
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

    def close(self) -> None:
        pass


REGISTRY = SimpleNamespace(name=KEY[0])


async def listening() -> tuple[asyncio.Server, str]:
    """A leader's data plane, as far as followers look: a port that accepts connections."""
    server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def spooling(spool: Spool, size: int) -> None:
    """What the download does once the upstream's 200 came."""
    spool.size, spool.state = size, State.SPOOLING
    spool.decided.set()


def test_cluster_spools_one_download_for_two_replicas_then_takeover(redis_server):
    async def main():
        links = [RedisLink(redis_server.url, 0.5) for _ in range(2)]
        a_local, b_local = FakeSpools(), FakeSpools()
        server, a_url = await listening()
        a = ClusterSpools(a_local, BlobLeases(links[0], a_url, ttl=0.4), renew_every=0.1)
        b = ClusterSpools(b_local, BlobLeases(links[1], "http://b:5050", ttl=0.4), renew_every=0.1)
        spool = await a.follow(REGISTRY, KEY[1], KEY[2])
        assert isinstance(spool, Spool) and a_local.downloads.claimed == [KEY]
        following = asyncio.ensure_future(b.follow(REGISTRY, KEY[1], KEY[2]))
        await asyncio.sleep(0.2)
        assert not following.done()  # b waits for a's size
        spooling(spool, 4096)
        peer = await asyncio.wait_for(following, 5)
        assert peer == PeerSpool(KEY, 4096, "application/octet-stream", a_url)
        assert b_local.downloads.claimed == []
        # b's HEAD is answered from what a published, without the upstream.
        assert await b.head(KEY) == (BlobHead(KEY[2], 4096, "application/octet-stream"), False)
        await asyncio.sleep(0.6)  # a renews past the lease's expiry
        assert await b.follow(REGISTRY, KEY[1], KEY[2]) == peer
        # a dies: it renews no more, its lease expires, and b's next request takes it over.
        for task in a.tasks:
            task.cancel()
        await asyncio.sleep(0.6)
        assert isinstance(await b.follow(REGISTRY, KEY[1], KEY[2]), Spool) and b_local.downloads.claimed == [KEY]
        b.close()
        server.close()
        for link in links:
            await link.close()

    asyncio.run(main())


def test_cluster_spools_release_when_the_spool_goes(redis_server):
    async def main():
        links = [RedisLink(redis_server.url, 0.5) for _ in range(2)]
        a_local, b_local = FakeSpools(), FakeSpools()
        a = ClusterSpools(a_local, BlobLeases(links[0], "http://a:5050"), renew_every=0.05)
        b = ClusterSpools(b_local, BlobLeases(links[1], "http://b:5050"), renew_every=0.05)
        spool = await a.follow(REGISTRY, KEY[1], KEY[2])
        spool.state = State.GONE  # declined: no 200 from the upstream
        spool.decided.set()
        del a_local.downloads.spools[KEY]
        await asyncio.wait_for(asyncio.gather(*a.tasks), 5)
        assert await a.leases.leader(KEY) is None
        assert isinstance(await b.follow(REGISTRY, KEY[1], KEY[2]), Spool)  # b tries itself
        b.close()
        for link in links:
            await link.close()

    asyncio.run(main())


def test_cluster_spools_redis_down_each_replica_on_its_own_then_back(redis_server, monkeypatch):
    monkeypatch.setattr(link_module, "PROBE_INTERVAL", 0.05)

    async def main():
        links = [RedisLink(redis_server.url, 0.3) for _ in range(2)]
        a_local, b_local = FakeSpools(), FakeSpools()
        server, a_url = await listening()
        a = ClusterSpools(a_local, BlobLeases(links[0], a_url), renew_every=0.05)
        b = ClusterSpools(b_local, BlobLeases(links[1], "http://b:5050"), renew_every=0.05)
        redis_server.pause()
        assert isinstance(await a.follow(REGISTRY, KEY[1], KEY[2]), Spool)
        assert isinstance(await b.follow(REGISTRY, KEY[1], KEY[2]), Spool)  # no pull waits on Redis
        assert a_local.downloads.claimed == b_local.downloads.claimed == [KEY]
        with pytest.raises(SharedStateDown):
            await links[0].call(lambda r: r.ping())
        redis_server.resume()
        for _ in range(100):
            if all(link.up for link in links):
                break
            await asyncio.sleep(0.05)
        other = (KEY[0], KEY[1], "sha256:" + "cd" * 32)
        spool = await a.follow(REGISTRY, other[1], other[2])
        spooling(spool, 10)
        assert await asyncio.wait_for(b.follow(REGISTRY, other[1], other[2]), 5) == PeerSpool(
            other, 10, "application/octet-stream", a_url)  # cluster-wide again
        a.close()
        b.close()
        server.close()
        for link in links:
            await link.close()

    asyncio.run(main())


def test_cluster_spools_take_over_from_a_leader_whose_data_plane_is_gone(redis_server):
    """A replica SIGKILLed keeps its leases until they expire; its data plane refuses connections
    at once, so the next request takes the blob over instead of sending a client there."""
    async def main():
        links = [RedisLink(redis_server.url, 0.5) for _ in range(2)]
        a_local, b_local = FakeSpools(), FakeSpools()
        server, a_url = await listening()
        a = ClusterSpools(a_local, BlobLeases(links[0], a_url), renew_every=0.05)
        b = ClusterSpools(b_local, BlobLeases(links[1], "http://b:5050"), renew_every=0.05)
        spooling(await a.follow(REGISTRY, KEY[1], KEY[2]), 10)
        assert await asyncio.wait_for(b.follow(REGISTRY, KEY[1], KEY[2]), 5) == PeerSpool(
            KEY, 10, "application/octet-stream", a_url)
        for task in a.tasks:  # a dies: no more renewals, and nothing listens on its data plane
            task.cancel()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(1.1)  # past REACHABLE_FOR: b looks again
        assert isinstance(await asyncio.wait_for(b.follow(REGISTRY, KEY[1], KEY[2]), 5), Spool)
        assert b_local.downloads.claimed == [KEY] and (await b.leases.leader(KEY)).dataplane == "http://b:5050"
        b.close()
        for link in links:
            await link.close()

    asyncio.run(main())


def test_cluster_spools_requests_on_the_leader_meanwhile_follow_its_spool(redis_server):
    """Requests on one replica that ask Redis while the first one takes the lease find that one's
    spool (they must not wait for a lease this replica holds)."""
    async def main():
        link = RedisLink(redis_server.url, 0.5)
        local = FakeSpools()
        a = ClusterSpools(local, BlobLeases(link, "http://a:5050"), renew_every=0.05)
        spools = await asyncio.wait_for(asyncio.gather(*(a.follow(REGISTRY, KEY[1], KEY[2]) for _ in range(8))), 5)
        assert all(spool is spools[0] and isinstance(spool, Spool) for spool in spools)
        assert local.downloads.claimed == [KEY]
        a.close()
        await link.close()

    asyncio.run(main())
