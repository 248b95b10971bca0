"""Reads in flight of the whole cluster (cluster/reads.py), against a real redis-server: a send
registered by one process is seen by another's budget while it lasts, and no longer once it
ended; a reader that dies (renews no more) is counted no more past its deadline; Redis down,
sends go on unregistered; URLs handed out are registered once per blob and margin, each
covered to its end. And which of the proxy's flows it registers (mitm/budget.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from mitmproxy.test import tflow, tutils

from regcache_core.cluster.link import RedisLink
from regcache_core.cluster.reads import ClusterReads, reads_key
from regcache_core.mitm import budget as budget_module
from regcache_core.mitm.budget import DiskBudget
from regcache_core.mitm.flow_notes import note
from regcache_core.mitm.settings import Settings
from regcache_core.observe.metrics import Metrics
from regcache_core.routing import Target

BLOB = ("docker.io", "sha256:" + "cd" * 32)


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
        await asyncio.sleep(1.0)  # its last renewal may land a moment after the close, then 0.4 s
        after = await other.read_anywhere(*BLOB)
        ttl = await link.call(lambda r: r.pttl(reads_key(BLOB)))
        await link.close()
        return before, after, ttl

    before, after, ttl = asyncio.run(main())
    assert (before, after, ttl) == (True, False, -2)  # -2: the key is gone


def test_a_handed_out_url_is_a_read_for_as_long_as_it_is_valid(redis_server):
    async def main():
        link = RedisLink(redis_server.url, 0.5)
        proxy, data_plane, budget = (ClusterReads(link, ttl=0.3, renew_every=0.1, url_margin=0.3) for _ in range(3))
        proxy.handed_out(*BLOB, valid_for=1.5)
        async with data_plane.read(*BLOB):  # the client follows it: a read's shorter TTL on the same key
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.6)  # past the read's TTL, within the URL's validity
        during = await budget.read_anywhere(*BLOB)
        ttl_during = await link.call(lambda r: r.pttl(reads_key(BLOB)))
        await asyncio.sleep(1.3)  # past the URL's end and the margin
        after = await budget.read_anywhere(*BLOB)
        for reads in (proxy, data_plane, budget):
            reads.close()
        await link.close()
        return during, ttl_during, after

    during, ttl_during, after = asyncio.run(main())
    assert during and ttl_during > 300 and not after


async def registrations(link: RedisLink) -> int:
    """The EVALs Redis ran since its stats were reset: each a registration, in these tests."""
    stats = await link.call(lambda r: r.info("commandstats"))
    return stats.get("cmdstat_eval", {}).get("calls", 0)


async def url_deadline(link: RedisLink, reads: ClusterReads) -> tuple[float, float]:
    """(the deadline of the process's URLs of BLOB in Redis, Redis's time now), in ms."""
    deadline = await link.call(lambda r: r.zscore(reads_key(BLOB), f"{reads.reader}:url"))
    seconds, microseconds = await link.call(lambda r: r.time())
    return deadline, seconds * 1000 + microseconds / 1000


def test_a_url_handed_out_within_the_margin_of_a_registration_is_covered_by_it_to_its_end(redis_server):
    async def main():
        link = RedisLink(redis_server.url, 0.5)
        proxy, budget = ClusterReads(link, url_margin=1.5), ClusterReads(link)
        await link.call(lambda r: r.config_resetstat())
        proxy.handed_out(*BLOB, valid_for=1.5)
        await asyncio.sleep(1.0)  # within the margin, near its end
        proxy.handed_out(*BLOB, valid_for=1.5)  # valid until 2.5 s, registered until 3 s
        deadline, now = await url_deadline(link, proxy)
        calls = await registrations(link)
        await asyncio.sleep(0.8)  # past the first URL's end, within the second's
        during = await budget.read_anywhere(*BLOB)
        proxy.handed_out(*BLOB, valid_for=1.5)  # would outlast the registration: registered again
        await asyncio.sleep(0.2)
        calls_after = await registrations(link) - 1  # the read_anywhere
        proxy.close()
        await link.close()
        return deadline - now, calls, during, calls_after

    covered_for, calls, during, calls_after = asyncio.run(main())
    assert covered_for >= 1500 and calls == 1 and during and calls_after == 2


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


class RecordedReads:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, str]]] = []

    def started(self, registry: str, digest: str) -> None:
        self.calls.append(("started", (registry, digest)))

    def ended(self, blob) -> None:
        self.calls.append(("ended", blob))

    def handed_out(self, registry: str, digest: str, valid_for: float) -> None:
        self.calls.append(("handed out", (registry, digest)))


def blob_flow(status: int, object_store: object | None = None, digest: str = BLOB[1]):
    """A client's GET of a blob of the cache of BLOB's registry, answered `status`."""
    registry = SimpleNamespace(name=BLOB[0], cache="http://127.0.0.1:5001", object_store=object_store)
    flow = tflow.tflow(resp=tutils.tresp(status_code=status))
    note(flow).target = Target(registry, "blob", "library/app", digest, f"/v2/library/app/blobs/{digest}")
    return flow


@pytest.mark.parametrize("status", [200, 307])
def test_the_proxy_registers_a_blob_it_sends_until_its_flow_ends_and_no_307(status):
    reads = RecordedReads()
    budget = DiskBudget(Settings(), Metrics(), SimpleNamespace(reads=reads))
    flow = blob_flow(status)
    budget.requestheaders(flow)
    budget.responseheaders(flow)
    sending = list(reads.calls)
    budget.response(flow)
    budget.worker.shutdown()
    if status == 200:
        assert (sending, reads.calls[len(sending):]) == ([("started", BLOB)], [("ended", BLOB)])
    else:
        assert reads.calls == []


def test_the_proxy_registers_a_url_it_hands_out_for_a_blob_of_an_object_store():
    reads = RecordedReads()
    budget = DiskBudget(Settings(), Metrics(), SimpleNamespace(reads=reads))
    flow = blob_flow(307, object_store=object())
    budget.requestheaders(flow)
    budget.responseheaders(flow)
    budget.response(flow)
    budget.worker.shutdown()
    assert reads.calls == [("handed out", BLOB)] and budget._busy(*BLOB)


def test_a_rollout_of_one_blob_through_the_proxy_makes_one_redis_registration(redis_server):
    """500 nodes pull one layer: 500 307s, one registration, covering the last URL to its end."""
    async def main():
        link = RedisLink(redis_server.url, 0.5)
        reads = ClusterReads(link)
        budget = DiskBudget(Settings(), Metrics(), SimpleNamespace(reads=reads))
        await link.call(lambda r: r.config_resetstat())
        for _ in range(500):
            flow = blob_flow(307, object_store=object())
            budget.requestheaders(flow)
            budget.response(flow)
        await asyncio.sleep(0.2)  # the registration is on its way in a task of its own
        deadline, now = await url_deadline(link, reads)
        calls = await registrations(link)
        budget.worker.shutdown()
        reads.close()
        await link.close()
        return calls, deadline - now

    calls, covered_for = asyncio.run(main())
    assert calls == 1 and covered_for >= budget_module.HANDED_OUT_FOR * 1000


def test_a_url_handed_out_keeps_its_blob_here_while_valid_and_the_tick_forgets_it_after(monkeypatch):
    monkeypatch.setattr(budget_module, "HANDED_OUT_FOR", 1.0)
    monkeypatch.setattr(budget_module, "TICK", 0.05)
    later = "sha256:" + "ef" * 32

    async def main():
        budget = DiskBudget(Settings(), Metrics(), SimpleNamespace(reads=None))
        await budget.running()
        budget.response(blob_flow(307, object_store=object()))
        await asyncio.sleep(0.6)
        budget.response(blob_flow(307, object_store=object(), digest=later))
        kept = budget._busy(*BLOB), budget._busy(BLOB[0], later)
        await asyncio.sleep(0.6)  # past the first URL's end, within the second's
        left = list(budget._handed_out), budget._busy(*BLOB), budget._busy(BLOB[0], later)
        budget.done()
        return kept, left

    kept, (left, first, second) = asyncio.run(main())
    assert kept == (True, True) and left == [(BLOB[0], later)] and not first and second
