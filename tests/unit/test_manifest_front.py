"""The tag cache, the manifests in memory and the answers planned from them, without mitmproxy."""

from __future__ import annotations

import asyncio
import hashlib

from regcache_core.config import Registry
from regcache_core.manifests.front import ManifestFront, accepted_types
from regcache_core.manifests.by_digest import ManifestCache
from regcache_core.observe.metrics import Metrics
from regcache_core.manifests.tags import TagCache
from regcache_core.upstream.client import NoAnswer
from regcache_core.upstream.signals import UpstreamAnswers
from regcache_core.upstream.state import UpstreamState

HUB = Registry("DOCKERHUB", "docker.io", "https://registry-1.docker.io", "http://127.0.0.1:5001")
OCI = "application/vnd.oci.image.manifest.v1+json"


def manifest(content: bytes) -> tuple[str, bytes, dict]:
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    return digest, content, {"Content-Type": OCI, "Docker-Content-Digest": digest, "Content-Length": str(len(content)),
                             "Etag": f'"{digest}"'}


def test_every_accept_line_counts_and_parameters_are_dropped():
    assert accepted_types(["a/b, c/d;q=0.5", "E/F"]) == {"a/b", "c/d", "e/f"}
    assert accepted_types([]) == set()


def test_manifests_in_memory_are_checked_against_their_digest_and_bounded():
    cache = ManifestCache(max_bytes=100)
    digest, body, headers = manifest(b"x" * 60)
    assert cache.put("docker.io", digest, b"y" * 60, headers) is None  # not that digest's content
    kept = cache.put("docker.io", digest, body, headers)
    assert kept.body == body and dict(kept.headers)["Etag"] == f'"{digest}"' and kept.media_type == OCI
    other, other_body, other_headers = manifest(b"z" * 60)
    cache.put("docker.io", other, other_body, other_headers)
    assert cache.get("docker.io", digest) is None and len(cache) == 1 and cache.size == 60  # the older one went


def test_tags_survive_a_restart_and_go_stale_after_their_ttl(tmp_path):
    now = [1000.0]

    async def learn():
        tags = TagCache(tmp_path, ttl=60, clock=lambda: now[0])
        tags.learn("docker.io", "library/small", "1.0", "sha256:" + "a" * 64, OCI, 500)
        await tags.flush()
        tags.close()

    async def read():
        tags = TagCache(tmp_path, ttl=60, clock=lambda: now[0])
        entry = await tags.get("docker.io", "library/small", "1.0")
        fresh = tags.is_fresh(entry)
        now[0] += 61
        return entry, fresh, tags.is_fresh(entry)

    asyncio.run(learn())
    entry, fresh, later = asyncio.run(read())
    assert (entry.digest, entry.media_type, entry.size, fresh, later) == ("sha256:" + "a" * 64, OCI, 500, True, False)


class SlowUpstream:
    """An upstream whose HEAD takes a while and answers one digest, or no answer at all."""

    timeout = 1.0

    def __init__(self, digest: str | None):
        self.digest = digest
        self.heads = 0

    async def head(self, url, headers):
        self.heads += 1
        await asyncio.sleep(0.05)
        if self.digest is None:
            raise NoAnswer("refused")
        return 200, {"Docker-Content-Digest": self.digest}

    async def close(self):
        pass


class NoAuth:
    async def authorization(self, registry, repository):
        return None

    def accepted(self, registry, repository):
        pass


def stale_front(tmp_path, upstream_digest: str | None) -> tuple[ManifestFront, SlowUpstream, str]:
    now = [1000.0]
    digest, body, headers = manifest(b"{}")
    upstream = SlowUpstream(upstream_digest)
    metrics = Metrics()

    async def never(url):
        await asyncio.sleep(3600)

    front = ManifestFront(TagCache(tmp_path, ttl=60, clock=lambda: now[0]), ManifestCache(1 << 20), upstream,
                          UpstreamAnswers(NoAuth(), UpstreamState(metrics, never), metrics))
    front.learn(HUB, "library/small", "1.0", headers, body)
    now[0] += 61
    return front, upstream, digest


def test_concurrent_revalidations_of_a_tag_share_one_head_and_the_same_digest_is_a_hit(tmp_path):
    async def run():
        front, upstream, digest = stale_front(tmp_path, None)
        upstream.digest = digest
        plans = await asyncio.gather(*(front.plan(HUB, "library/small", "1.0", [OCI]) for _ in range(10)))
        again = await front.plan(HUB, "library/small", "1.0", [OCI])  # fresh again: no HEAD
        front.close()
        front.tags.close()
        return plans, again, upstream.heads

    plans, again, heads = asyncio.run(run())
    assert heads == 1 and {(p.cache, p.manifest is not None) for p in [*plans, again]} == {("hit", True)}


def test_an_unreachable_upstream_serves_the_last_digest_as_stale_and_is_not_asked_again_while_down(tmp_path):
    async def run():
        front, upstream, digest = stale_front(tmp_path, None)
        first = await front.plan(HUB, "library/small", "1.0", [OCI])
        second = await front.plan(HUB, "library/small", "1.0", [OCI])
        other_client = await front.plan(HUB, "library/small", "1.0", ["application/json"])
        down = front.state.reason_down("docker.io")
        front.state.close()
        front.close()
        front.tags.close()
        return first, second, other_client, down, upstream.heads, digest

    first, second, other_client, down, heads, digest = asyncio.run(run())
    assert (first.cache, first.digest, second.cache) == ("stale", digest, "stale")
    assert other_client is None  # its Accept does not name what is held: through to the cache
    assert (down, heads) == ("refused", 1)


class RateLimitedUpstream(SlowUpstream):
    """Docker Hub past its pull limit: a 429 to the HEAD, with its rate-limit headers."""

    async def head(self, url, headers):
        self.heads += 1
        return 429, {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "0;w=21600", "retry-after": "60"}


def test_a_tag_revalidation_reports_rate_limits_and_429s_like_every_upstream_answer(tmp_path, caplog):
    async def run():
        front, _, digest = stale_front(tmp_path, None)
        front.client = RateLimitedUpstream(None)
        plan = await front.plan(HUB, "library/small", "1.0", [OCI])
        front.close()
        front.state.close()
        front.tags.close()
        return plan, digest, front.upstream.metrics.registry

    plan, digest, metrics = asyncio.run(run())
    assert (plan.cache, plan.digest) == ("stale", digest)  # the last known digest, at once
    assert metrics.get_sample_value("regcache_upstream_ratelimit_remaining", {"registry": "docker.io"}) == 0
    assert any("answered 429" in r.getMessage() for r in caplog.records)


def cold_front(tmp_path) -> ManifestFront:
    metrics = Metrics()

    async def never(url):
        await asyncio.sleep(3600)

    return ManifestFront(TagCache(tmp_path, ttl=60), ManifestCache(1 << 20), SlowUpstream(None),
                         UpstreamAnswers(NoAuth(), UpstreamState(metrics, never), metrics))


def close(front: ManifestFront) -> None:
    front.state.close()
    front.close()
    front.tags.close()


def test_concurrent_requests_for_a_cold_tag_wait_for_the_first_ones_answer_and_are_planned_from_it(tmp_path):
    async def run():
        front = cold_front(tmp_path)
        first = await front.plan(HUB, "library/small", "1.0", [OCI])  # to the cache
        waiting = [asyncio.create_task(front.plan(HUB, "library/small", "1.0", [OCI])) for _ in range(5)]
        await asyncio.sleep(0.1)
        still_waiting = not any(task.done() for task in waiting)
        digest, body, headers = manifest(b"{}")
        front.learn(HUB, "library/small", "1.0", headers, body)
        front.answered(HUB, "library/small", "1.0")
        plans = await asyncio.gather(*waiting)
        close(front)
        return first, still_waiting, plans, digest

    first, still_waiting, plans, digest = asyncio.run(run())
    assert first is None and still_waiting
    assert {(p.cache, p.digest, p.manifest is not None) for p in plans} == {("hit", digest, True)}


class LaggingTags:
    """A tag store whose next lookup answers what it held when asked, but only once let go."""

    def __init__(self, tags: TagCache) -> None:
        self.tags = tags
        self.asked, self.go = asyncio.Event(), asyncio.Event()

    async def get(self, registry, repository, tag):
        entry = await self.tags.get(registry, repository, tag)
        self.asked.set()
        await self.go.wait()
        self.get = self.tags.get  # later lookups as usual
        return entry

    def __getattr__(self, name):
        return getattr(self.tags, name)


def test_a_request_whose_lookup_predates_the_first_ones_answer_looks_again_instead_of_asking_the_cache(tmp_path):
    """Seen in CI: 8 cold pulls, 2 tag HEADs upstream. A late request read the tag store (in a
    thread) before the first answer was learnt and returned after its `answered` had gone."""
    async def run():
        front = cold_front(tmp_path)
        first = await front.plan(HUB, "library/small", "1.0", [OCI])  # to the cache
        front.tags = lagging = LaggingTags(front.tags)
        late = asyncio.create_task(front.plan(HUB, "library/small", "1.0", [OCI]))
        await lagging.asked.wait()  # it has looked: nothing known yet
        digest, body, headers = manifest(b"{}")
        front.learn(HUB, "library/small", "1.0", headers, body)
        front.answered(HUB, "library/small", "1.0")
        lagging.go.set()
        plan = await late
        waiting_left = dict(front.flights._asked)
        front.tags = lagging.tags
        close(front)
        return first, plan, digest, waiting_left

    first, plan, digest, waiting_left = asyncio.run(run())
    assert first is None
    assert plan is not None and (plan.cache, plan.digest) == ("hit", digest), "answered from what was learnt"
    assert waiting_left == {}, "nothing left for later requests to wait on"
