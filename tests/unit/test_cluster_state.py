"""The state replicas share in Redis (cluster/), against a real redis-server: each replica here is
its own link, tag store, flights and upstream state in one event loop, as two processes would
be. Shared while Redis answers; each replica on its own while it is stopped or paused (one
warning, no call paying the deadline twice); shared again once it is back."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from regcache_core.budget.inventory import holdings
from regcache_core.budget.usage import UsageStore, usage_file
from regcache_core.cluster import leases as leases_module
from regcache_core.cluster import link as link_module
from regcache_core.cluster import upstream as upstream_module
from regcache_core.cluster.flights import SharedFlights
from regcache_core.cluster.leases import Leases
from regcache_core.cluster.link import RedisLink
from regcache_core.cluster.tags import SharedTags
from regcache_core.cluster.upstream import SharedUpstreamState
from regcache_core.cluster.usage import EVICTION, SharedUsage, read_last_pulls
from regcache_core.config import load_config
from regcache_core.manifests.by_digest import ManifestCache
from regcache_core.manifests.front import ManifestFront
from regcache_core.manifests.tags import TagCache
from regcache_core.observe.metrics import Metrics
from regcache_core.upstream.signals import UpstreamAnswers
from regcache_core.upstream.state import UpstreamState
from tests.support.redis_server import RedisServer
from tests.unit.test_manifest_front import HUB, OCI, NoAuth, SlowUpstream, manifest

REPO = "library/small"


@pytest.fixture
def redis_server(tmp_path, monkeypatch):
    monkeypatch.setattr(link_module, "PROBE_INTERVAL", 0.05)
    monkeypatch.setattr(upstream_module, "LISTEN_TICK", 0.05)
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


class Replica:
    """One replica's shared state, as Services builds it. Its upstream probe answers while
    `reachable` (this replica's own route to the upstream); it probes on its own only once an
    hour, so what makes it probe here is what it is told."""

    def __init__(self, name: str, url: str, directory: Path, now: list[float], upstream: SlowUpstream,
                 lease_ttl: float = leases_module.LEASE_TTL) -> None:
        self.name = name
        self.link = RedisLink(url, 0.3)
        self.metrics = Metrics()
        metrics = self.metrics
        self.reachable = True
        self.probes = 0
        self.own_state = UpstreamState(metrics, self._probe, retry_every=3600)
        self.state = SharedUpstreamState(self.link, self.own_state, name)
        self.leases = Leases(self.link, name, lease_ttl)
        self.tags = SharedTags(self.link, TagCache(directory / name, ttl=60, clock=lambda: now[0]))
        self.front = ManifestFront(self.tags, ManifestCache(1 << 20), upstream,
                                   UpstreamAnswers(NoAuth(), self.state, metrics), SharedFlights(self.leases, self.tags.flush))

    async def _probe(self, url: str) -> None:
        self.probes += 1
        if not self.reachable:
            raise ConnectionRefusedError(111, "Connection refused")

    def upstream_up(self) -> float:
        return self.metrics.registry.get_sample_value("regcache_upstream_up", {"registry": "docker.io"})

    async def plan(self, reference: str = "1.0"):
        return await self.front.plan(HUB, REPO, reference, [OCI])

    async def close(self) -> None:
        self.front.close()
        self.tags.close()
        self.state.close()
        self.own_state.close()
        await self.link.close()


async def eventually(check, within: float = 10.0) -> bool:
    """Bounds a wait for what another replica does: never a timing assertion, a bound."""
    for _ in range(int(within / 0.02)):
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


def test_a_tag_learnt_by_one_replica_is_fresh_on_all_and_revalidated_once_for_all(redis_server, tmp_path):
    now = [1000.0]
    digest, body, headers = manifest(b"{}")
    upstream = SlowUpstream(digest)

    async def run():
        a, b = (Replica(n, redis_server.url, tmp_path, now, upstream) for n in "ab")
        a.front.learn(HUB, REPO, "1.0", headers, body)
        await a.tags.flush()
        within_ttl = [await (a if i % 2 else b).plan() for i in range(50)]
        heads_within = upstream.heads
        now[0] += 61
        after_ttl = await asyncio.gather(*((a if i % 2 else b).plan() for i in range(50)))
        again = await b.plan()
        for replica in (a, b):
            await replica.close()
        return within_ttl, heads_within, after_ttl, again

    within_ttl, heads_within, after_ttl, again = asyncio.run(run())
    assert heads_within == 0
    assert {(p.cache, p.digest) for p in within_ttl} == {("hit", digest)}
    assert upstream.heads == 1, "one HEAD for the cluster once the TTL passed"
    assert {(p.cache, p.digest) for p in [*after_ttl, again]} == {("hit", digest)}


def test_concurrent_cold_requests_on_other_replicas_wait_for_the_first_ones_answer(redis_server, tmp_path):
    now = [1000.0]
    digest, body, headers = manifest(b"{}")

    async def run():
        a, b, c = (Replica(n, redis_server.url, tmp_path, now, SlowUpstream(None)) for n in "abc")
        first = await a.plan()  # to a's cache
        waiting = [asyncio.create_task(r.plan()) for r in (a, b, b, c, c)]
        await asyncio.sleep(0.3)
        still_waiting = not any(task.done() for task in waiting)
        a.front.learn(HUB, REPO, "1.0", headers, body)
        a.front.answered(HUB, REPO, "1.0")
        plans = await asyncio.gather(*waiting)
        for replica in (a, b, c):
            await replica.close()
        return first, still_waiting, plans

    first, still_waiting, plans = asyncio.run(run())
    assert first is None and still_waiting
    # a answers from memory; b and c ask their caches by digest (the shared storage holds it): no upstream request
    assert {(p.cache, p.digest) for p in plans} == {("hit", digest)}


def test_a_leader_that_dies_loses_its_lease_and_a_waiter_takes_over(redis_server, tmp_path):
    now = [1000.0]

    async def run():
        a, b = (Replica(n, redis_server.url, tmp_path, now, SlowUpstream(None), lease_ttl=0.3) for n in "ab")
        first = await a.plan()
        a.front.flights._held[(HUB.name, REPO, "1.0")]._renewal.cancel()  # a dies: its lease is no longer renewed
        taken_over = await b.plan()  # after the lease lapsed: b asks its cache itself
        held = (HUB.name, REPO, "1.0") in b.front.flights._held
        for replica in (a, b):
            await replica.close()
        return first, taken_over, held

    first, taken_over, held = asyncio.run(run())
    assert first is None and taken_over is None and held


def test_with_redis_stopped_each_replica_goes_on_alone_and_shares_again_once_it_is_back(redis_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    now = [1000.0]
    digest, body, headers = manifest(b"{}")
    other, other_body, other_headers = manifest(b'{"v":2}')

    async def run():
        a, b = (Replica(n, redis_server.url, tmp_path, now, SlowUpstream(None)) for n in "ab")
        redis_server.stop()
        a.front.learn(HUB, REPO, "1.0", headers, body)  # the write to Redis fails: a keeps it
        alone = await a.plan()
        cold_on_b = await b.plan()  # b does not know it, and waits for nobody
        b.front.answered(HUB, REPO, "1.0")
        redis_server.start()
        back = await eventually(lambda: a.link.up and b.link.up)
        a.front.learn(HUB, REPO, "1.0", other_headers, other_body)
        await a.tags.flush()
        shared = await b.plan()
        for replica in (a, b):
            await replica.close()
        return alone, cold_on_b, back, shared

    alone, cold_on_b, back, shared = asyncio.run(run())
    assert (alone.cache, alone.digest) == ("hit", digest)
    assert cold_on_b is None and back
    assert (shared.cache, shared.digest) == ("hit", other)
    warnings = [r.getMessage() for r in caplog.records if r.name == link_module.__name__]
    assert sum("unreachable" in w for w in warnings) == 2 and sum("share state again" in w for w in warnings) == 2  # one each way, per replica


def test_with_redis_paused_a_request_pays_the_deadline_once_and_pulls_go_on(redis_server, tmp_path):
    now = [1000.0]
    digest, body, headers = manifest(b"{}")

    async def run():
        a = Replica("a", redis_server.url, tmp_path, now, SlowUpstream(None))
        a.front.learn(HUB, REPO, "1.0", headers, body)
        await a.tags.flush()
        now[0] += 1  # its copy is older than LOCAL_FOR: the next lookup asks Redis
        a.tags._copies.clear()
        redis_server.pause()
        first = await a.plan()  # the lookup misses the deadline: a's own store answers
        down = not a.link.up
        later = [await a.plan() for _ in range(20)]
        redis_server.resume()
        back = await eventually(lambda: a.link.up)
        await a.close()
        return first, down, later, back

    first, down, later, back = asyncio.run(run())
    assert (first.cache, first.digest) == ("hit", digest) and down and back
    assert {(p.cache, p.digest) for p in later} == {("hit", digest)}


def test_an_upstream_found_down_by_one_replica_is_checked_by_each_other_and_down_where_it_is_unreachable(redis_server, tmp_path):
    """Truly down: replica a finds it, b is told and skips it at once, its own probe fails too;
    back: b's answer tells a, whose probe then answers at once. A replica started later checks
    what Redis holds."""
    now = [1000.0]

    async def run():
        a, b = (Replica(n, redis_server.url, tmp_path, now, SlowUpstream(None)) for n in "ab")
        await eventually(lambda: False, within=0.2)  # both listening
        a.reachable = b.reachable = False
        a.state.went_down("docker.io", HUB.upstream, "timeout")
        b_down = await eventually(lambda: b.state.reason_down("docker.io") == "refused")
        b_checked = (b.probes, b.upstream_up())
        a.reachable = b.reachable = True
        b.state.answered("docker.io", HUB.upstream)  # a request of b's got an answer
        a_up = await eventually(lambda: a.state.reason_down("docker.io") is None)
        a.reachable = False
        a.state.went_down("docker.io", HUB.upstream, "refused")
        c = Replica("c", redis_server.url, tmp_path, now, SlowUpstream(None))  # a replica started later
        c.reachable = False
        c_down = await eventually(lambda: c.state.reason_down("docker.io") == "refused")
        for replica in (a, b, c):
            await replica.close()
        return b_down, b_checked, a_up, a.probes, c_down

    assert asyncio.run(run()) == (True, (1, 0), True, 1, True)


def test_an_upstream_unreachable_from_one_replica_only_stays_up_on_the_others_and_down_on_it(redis_server, tmp_path, caplog):
    """Replica a's own route to the upstream is cut: b is told, checks once, finds it up and says
    nothing; b's own changes never bring it back on a, whose probe it makes ask at once."""
    now = [1000.0]
    caplog.set_level(logging.WARNING)

    async def run():
        a, b = (Replica(n, redis_server.url, tmp_path, now, SlowUpstream(None)) for n in "ab")
        await eventually(lambda: False, within=0.2)
        a.reachable = False
        a.state.went_down("docker.io", HUB.upstream, "refused")
        b_checked = await eventually(lambda: b.probes == 1 and b.state.reason_down("docker.io") is None)
        b_state = (b.state.states(["docker.io"]), b.upstream_up())
        b.reachable = False  # a blip of b's own: down and back on b
        b.state.went_down("docker.io", HUB.upstream, "timeout")
        b.reachable = True
        b.state.answered("docker.io", HUB.upstream)
        a_asked = await eventually(lambda: a.probes >= 1)  # told "back" by b: a probes now, and stays down
        a_state = (a.state.states(["docker.io"]), a.upstream_up())
        for replica in (a, b):
            await replica.close()
        return b_checked, b_state, a_asked, a_state

    b_checked, b_state, a_asked, a_state = asyncio.run(run())
    assert b_checked and b_state == ({"docker.io": "up"}, None)
    assert a_asked and a_state == ({"docker.io": "down: refused"}, 0)
    said = [r.getMessage() for r in caplog.records if "upstream " in r.getMessage()]
    assert ["unreachable" in line for line in said] == [True, True, False], said  # a down; b's blip down and back


def test_a_replica_tells_the_others_what_it_found_never_what_it_was_told(redis_server, tmp_path):
    """b's own changes are sent after b was told another replica's word: what b sends is its own
    state (up), not the hint it is checking."""
    now = [1000.0]

    async def run():
        b = Replica("b", redis_server.url, tmp_path, now, SlowUpstream(None))
        await eventually(lambda: False, within=0.2)
        b.state.went_down("docker.io", HUB.upstream, "timeout")
        b.state.answered("docker.io", HUB.upstream)
        b.own_state.told_down("docker.io", HUB.upstream, "refused at another replica")  # before the sends run
        checked = await eventually(lambda: b.state.reason_down("docker.io") is None)
        await eventually(lambda: False, within=0.2)  # the sends done
        held = await b.link.call(lambda r: r.hgetall(upstream_module.DOWN))
        await b.close()
        return checked, held

    assert asyncio.run(run()) == (True, {})


def test_an_upstream_change_seen_while_redis_was_down_reaches_the_others_when_it_is_back(redis_server, tmp_path):
    now = [1000.0]

    async def run():
        a, b = (Replica(n, redis_server.url, tmp_path, now, SlowUpstream(None)) for n in "ab")
        await eventually(lambda: False, within=0.2)
        redis_server.stop()
        await eventually(lambda: False, within=0.2)
        a.reachable = b.reachable = False
        a.state.went_down("docker.io", HUB.upstream, "timeout")
        alone = (a.state.reason_down("docker.io"), b.state.reason_down("docker.io"), b.probes)
        redis_server.start()
        told = await eventually(lambda: b.state.reason_down("docker.io") == "refused")
        for replica in (a, b):
            await replica.close()
        return alone, told

    alone, told = asyncio.run(run())
    assert alone == ("timeout", None, 0) and told


def test_usage_records_are_the_clusters_and_one_replica_at_a_time_evicts(redis_server):
    async def run():
        a_link, b_link = RedisLink(redis_server.url, 0.3), RedisLink(redis_server.url, 0.3)
        a, b = SharedUsage(a_link), SharedUsage(b_link)
        await a.record([("docker.io", REPO, "sha256:" + "1" * 64, "blob", 100.0),
                        ("docker.io", REPO, "1.0", "manifest", 100.0)])
        await b.record([("docker.io", "library/other", "sha256:" + "1" * 64, "blob", 200.0),
                        ("docker.io", REPO, "1.0", "manifest", 50.0)])  # older: does not move it back
        blobs, pulls = await a.blob_last_use("docker.io"), await b.last_pulls("docker.io")
        a_lease = await Leases(a_link, "a").take(EVICTION)
        b_first = await Leases(b_link, "b").take(EVICTION)
        await a_lease.end()
        b_then = await Leases(b_link, "b").take(EVICTION)
        await b_then.end()
        await a_link.close()
        await b_link.close()
        return blobs, pulls, b_first, b_then

    blobs, pulls, b_first, b_then = asyncio.run(run())
    assert blobs == {"sha256:" + "1" * 64: 200.0} and pulls == {(REPO, "1.0"): 100.0}
    assert b_first is None and b_then is not None
    assert read_last_pulls(redis_server.url, 0.3, ["docker.io", "quay.io"]) == {"docker.io": {(REPO, "1.0"): 100.0}, "quay.io": {}}


def test_cache_ls_reads_the_clusters_last_pulls_and_this_replicas_own_while_redis_is_down(redis_server, tmp_path, capsys):
    data_dir = tmp_path / "data"
    config = load_config(environ={"REGCACHE_DATA_DIR": str(data_dir), "REGCACHE_REDIS_URL": redis_server.url,
                                  "REGCACHE_CLUSTER_SECRET": "unit-cluster-secret-0123",
                                  "REGCACHE_DATAPLANE_URL": "http://127.0.0.1:5050"}, env_file="/nonexistent/.env")
    tags = config.registries[0].storage / "docker/registry/v2/repositories" / REPO / "_manifests/tags/1.0/current"
    tags.mkdir(parents=True)
    (tags / "link").write_text("sha256:" + "a" * 64)
    store = UsageStore(usage_file(data_dir))
    store.record([(config.registries[0].name, REPO, "1.0", "manifest", 100.0)])  # this replica's own pull
    store.close()

    async def record_elsewhere():
        link = RedisLink(redis_server.url, 0.3)
        await SharedUsage(link).record([(config.registries[0].name, REPO, "1.0", "manifest", 200.0)])  # another replica's
        await link.close()

    def last_pulled() -> str:
        [cache] = [c for c in holdings(config)["caches"] if c["registry"] == config.registries[0].name]
        [repository] = [r for r in cache["repositories"] if r["repository"] == REPO]
        return repository["tags"][0]["last_pulled"]

    asyncio.run(record_elsewhere())
    shared = last_pulled()
    redis_server.stop()
    own = last_pulled()
    assert (shared, own) == ("1970-01-01T00:03:20+00:00", "1970-01-01T00:01:40+00:00")
    assert "shared state unreachable" in capsys.readouterr().err
