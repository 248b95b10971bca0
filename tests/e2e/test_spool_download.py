"""The proxy's own downloads of cold blobs into spools (spool_download.py), without mitmproxy:
a real registry upstream (behind its CDN redirect middleware for some), real files."""

from __future__ import annotations

import asyncio
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fakes import Cdn
from tests.support.parts import PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, Upstream, push_blob
from regcache_core.config import Registry
from regcache_core.observe.metrics import Metrics
from regcache_core.spool.table import SpoolTable
from regcache_core.spool.download import SpoolDownloads
from regcache_core.upstream.auth import TokenStore, UpstreamAuth
from regcache_core.upstream.client import UpstreamClient
from regcache_core.upstream.signals import UpstreamAnswers
from regcache_core.upstream.state import UpstreamState
from tests.unit.test_spool import read_all

PORT = PORT_BASES["test_spool_download"]
UPSTREAM_PORT = PORT + UPSTREAM_OFFSET
REPOSITORY = "library/blob"
BLOB = os.urandom(5 << 20)


@pytest.fixture(scope="module")
def cdn_upstream(tmp_path_factory):
    """A registry that sends its blob GETs to a CDN, as Docker Hub does, holding BLOB."""
    root = tmp_path_factory.mktemp("upstream")
    cdn = Cdn(root / "storage", UPSTREAM_PORT + 1).start()
    registry = Upstream(root, UPSTREAM_PORT, {"middleware": cdn.registry_middleware()}).start()
    digest = push_blob(registry.url, REPOSITORY, [BLOB])
    yield registry, cdn, digest
    registry.stop()
    cdn.stop()


class Downloads:
    """A SpoolDownloads over real parts, and what it told the hit tracking."""

    def __init__(self, tmp_path, upstream_url: str) -> None:
        self.registry = Registry("DOCKERHUB", "docker.io", upstream_url, "http://127.0.0.1:1")
        self.metrics = Metrics()
        self.client = UpstreamClient()
        self.state = UpstreamState(self.metrics, self.client.ping)
        self.auth = UpstreamAuth(TokenStore(tmp_path / "tokens"), self._fetch)
        self.fetched: list[tuple[str, str, str]] = []
        self.table = SpoolTable(tmp_path / "spools", max_disk=1 << 30, linger=60)
        self.downloads = SpoolDownloads(self.table, UpstreamAnswers(self.auth, self.state, self.metrics),
                                        lambda *blob: self.fetched.append(blob), timeout=10)

    async def _fetch(self, url, headers, timeout):
        return await self.client.get(url, headers, timeout, 1 << 20)

    async def close(self) -> None:
        spools = list(self.table._spools.values())
        await self.downloads.close()
        self.state.close()
        self.auth.store.close()
        await asyncio.gather(*(s.task for s in spools if s.task), return_exceptions=True)
        await self.client.close()


def run(scenario, tmp_path, upstream_url):
    async def main():
        downloads = Downloads(tmp_path, upstream_url)
        try:
            return await asyncio.wait_for(scenario(downloads), 60)
        finally:
            await downloads.close()

    return asyncio.run(main())


def test_one_download_serves_every_get_and_goes_on_when_they_leave(tmp_path, cdn_upstream):
    registry, cdn, digest = cdn_upstream
    before = len(registry.requests_for(digest, "GET"))

    async def scenario(d: Downloads):
        gets = [asyncio.create_task(d.downloads.follow(d.registry, REPOSITORY, digest)) for _ in range(4)]
        spools = await asyncio.gather(*gets)
        assert spools[0] is not None and all(spool is spools[0] for spool in spools), "one spool for all"
        spool = spools[0]
        # Every requester is gone now; the download is nobody's request, and ends whole.
        await asyncio.wait_for(spool.task, 30)
        assert spool.state.value == "complete"
        assert await read_all(spool.path, len(BLOB)) == BLOB
        assert d.fetched == [("docker.io", REPOSITORY, digest)], "one miss for the one fetch"
        return d.metrics

    metrics = run(scenario, tmp_path, registry.url)
    assert len(registry.requests_for(digest, "GET")) - before == 1
    cdn_gets = [r for r in cdn.requests if r[0] == "GET" and digest.split(":")[1] in r[1]]
    assert cdn_gets and all(authorization is None for _, _, authorization in cdn_gets), "a CDN gets no credentials"
    fetches = {labels: value for (name, labels), value in metric_samples(metrics) if name == "regcache_upstream_fetches_total"}
    assert sum(fetches.values()) == 2, fetches  # the upstream's 307, the CDN's 200


def test_a_blob_the_upstream_does_not_have_is_not_spooled(tmp_path, cdn_upstream):
    registry, _, _ = cdn_upstream
    missing = "sha256:" + "0" * 64

    async def scenario(d: Downloads):
        assert await d.downloads.follow(d.registry, REPOSITORY, missing) is None, "the GET goes upstream itself"
        assert d.fetched == [] and len(d.table) == 0

    run(scenario, tmp_path, registry.url)


def test_a_redirect_to_this_machine_is_not_followed_for_an_upstream_elsewhere(tmp_path, cdn_upstream):
    """The upstream, by a name (not on loopback as far as regcache knows), sends its blob to
    127.0.0.1: the download does not go there, and the GETs go upstream themselves."""
    registry, cdn, digest = cdn_upstream
    asked = len(cdn.requests)

    async def scenario(d: Downloads):
        assert await d.downloads.follow(d.registry, REPOSITORY, digest) is None
        assert d.fetched == []

    run(scenario, tmp_path, f"http://docker.io.{TEST_DOMAIN}:{registry.port}")
    assert len(cdn.requests) == asked


def test_a_download_whose_upstream_is_down_starts_nothing(tmp_path):
    async def scenario(d: Downloads):
        assert await d.downloads.follow(d.registry, REPOSITORY, "sha256:" + "1" * 64) is None
        assert d.state.reason_down("docker.io"), "the upstream is marked down, so the GETs get 503 at once"
        assert len(d.table) == 0

    run(scenario, tmp_path, f"http://127.0.0.1:{UPSTREAM_PORT + 2}")  # nothing listens there


def metric_samples(metrics: Metrics):
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            yield (sample.name, tuple(sorted(sample.labels.items()))), sample.value
