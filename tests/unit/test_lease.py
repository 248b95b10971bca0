"""The lease core (cluster/lease.py) against a real redis-server: taken only if free, renewed,
replaced and deleted only by the holder whose value is still there; kept while renewed, and a
holder whose lease lapsed and went to another stops renewing it and never touches it."""

from __future__ import annotations

import asyncio

from regcache_core.cluster.lease import HeldLease, delete_unchanged, take
from regcache_core.cluster.link import RedisLink

KEY = "regcache:test-lease"


def test_only_the_holder_whose_value_is_there_renews_replaces_or_deletes(redis_server):
    async def main():
        link = RedisLink(redis_server.url, 0.5)
        # A 1 s lease renewed every 0.1 s: a loaded machine may delay a renewal by tenths of a
        # second (a 0.3 s lease lapsed that way once), never by most of a second.
        mine = await take(link, KEY, "a", 1.0)
        theirs = await take(link, KEY, "b", 1.0)
        kept = asyncio.get_running_loop().create_task(mine.keep(0.1))
        await asyncio.sleep(1.5)  # past the expiry: renewed meanwhile
        still = await take(link, KEY, "b", 1.0)
        replaced = await mine.replace("a, published", ttl=5)
        stale = await delete_unchanged(link, KEY, "a")  # the value read before the replacement
        await asyncio.sleep(0.3)
        kept_after_replace = not kept.done()
        await link.call(lambda r: r.delete(KEY))  # as if it had lapsed
        successor = await take(link, KEY, "b", 0.3)
        await asyncio.wait_for(kept, 1)  # it finds the lease gone to another: it stops
        outcome = (await mine.renew(), await mine.replace("a again"), await mine.release(),
                   await link.call(lambda r: r.get(KEY)))
        await link.close()
        return isinstance(mine, HeldLease), theirs, still, replaced, stale, kept_after_replace, successor, outcome

    is_held, theirs, still, replaced, stale, kept_after_replace, successor, outcome = asyncio.run(main())
    assert (is_held, theirs, still, replaced, stale, kept_after_replace) == (True, b"a", b"a", True, False, True)
    assert isinstance(successor, HeldLease) and outcome == (False, False, False, b"b")
