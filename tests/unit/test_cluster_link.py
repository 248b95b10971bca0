"""The Redis link replicas share (cluster/link.py), against a real redis-server: calls within a
deadline, down at once on failure (no call pays the deadline again), one warning each way, back
when Redis answers again, and no password in anything it says."""

from __future__ import annotations

import asyncio
import logging

import pytest

from regcache_core.cluster import link as link_module
from regcache_core.cluster.link import RedisLink, SharedStateDown, describe_url


def test_describe_url_never_shows_the_password():
    assert describe_url("redis://:s3cret@redis.example:6380/2") == "redis://redis.example:6380/2"
    assert describe_url("rediss://user:s3cret@redis.example") == "rediss://redis.example"


def test_calls_go_through_within_the_deadline(redis_server):
    async def main():
        changes = []
        link = RedisLink(redis_server.url, 2.0, changes.append)
        await link.call(lambda r: r.set("k", "v"))
        assert await link.call(lambda r: r.get("k")) == b"v"
        assert link.up and link.state() == "ok" and changes == []
        await link.close()

    asyncio.run(main())


def test_redis_paused_then_back(redis_server, monkeypatch, caplog):
    monkeypatch.setattr(link_module, "PROBE_INTERVAL", 0.05)
    caplog.set_level(logging.WARNING)

    async def main():
        changes = []
        link = RedisLink(redis_server.url.replace("redis://", "redis://:pw-canary@"), 0.3, changes.append)
        redis_server.pause()
        with pytest.raises(SharedStateDown):
            async with asyncio.timeout(10):  # the test's bound: the link's own deadline ends it first
                await link.call(lambda r: r.get("k"))
        asked = []
        with pytest.raises(SharedStateDown):  # while down: at once, Redis is not asked
            await link.call(lambda r: asked.append(r))
        assert asked == []
        assert changes == [False] and link.state().startswith("down (no answer in time)")
        redis_server.resume()
        for _ in range(100):
            if link.up:
                break
            await asyncio.sleep(0.05)
        assert link.up and changes == [False, True]
        await link.call(lambda r: r.set("k", "v"))
        await link.close()

    asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.name == link_module.__name__]
    assert len(warnings) == 2, warnings
    assert "unreachable" in warnings[0] and "is back" in warnings[1]
    assert not any("pw-canary" in w for w in warnings)


def test_redis_stopped(redis_server, monkeypatch):
    monkeypatch.setattr(link_module, "PROBE_INTERVAL", 0.05)

    async def main():
        link = RedisLink(redis_server.url, 2.0)
        await link.call(lambda r: r.ping())
        redis_server.stop()
        with pytest.raises(SharedStateDown):
            await link.call(lambda r: r.ping())
        assert not link.up
        redis_server.start()  # the same port
        for _ in range(100):
            if link.up:
                break
            await asyncio.sleep(0.05)
        assert link.up
        await link.close()

    asyncio.run(main())
