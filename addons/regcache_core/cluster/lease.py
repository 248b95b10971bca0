"""A lease on the shared Redis: one replica at a time holds a key, and it lapses by itself when
its holder stops renewing (dies, pauses, loses Redis).

The key is set only if absent, with an expiry (SET NX PX), to a value that names its holder.
The holder renews it (the expiry starts again), replaces its value, or deletes it, each only
while the key still holds the value it last wrote, in one script (atomic in Redis): once a lease
lapsed another replica may hold it, and a holder back from a pause never touches its
successor's. What a lease's value says and how long it lives are its users' (leases.py:
references, revalidations, the disk budget; blob_leases.py: cold blobs).

Every call goes through the link (link.py): while Redis is down it raises SharedStateDown at
once, and callers go on with their own replica's state.
"""

from __future__ import annotations

import asyncio

from .link import RedisLink

# Each compares the key's value with the one its holder last wrote (ARGV[1]) before touching it.
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_REPLACE = ("if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) "
            "return 1 end return 0")
_DELETE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class HeldLease:
    """A lease this replica took: its key and the value it last wrote there."""

    def __init__(self, link: RedisLink, key: str, value: str, ttl: float) -> None:
        self.link = link
        self.key = key
        self.value = value
        self.ttl = ttl  # seconds

    async def renew(self) -> bool:
        """Whether the lease is still ours (and now lives its whole expiry again). Raises SharedStateDown."""
        ttl_ms = int(self.ttl * 1000)
        return bool(await self.link.call(lambda r: r.eval(_RENEW, 1, self.key, self.value, ttl_ms)))

    async def replace(self, value: str, ttl: float | None = None) -> bool:
        """Write `value` instead, living `ttl` (the lease's own by default); whether it was still
        ours. Raises SharedStateDown."""
        ttl_ms = int((self.ttl if ttl is None else ttl) * 1000)
        replaced = await self.link.call(lambda r: r.eval(_REPLACE, 1, self.key, self.value, value, ttl_ms))
        if replaced:
            self.value = value
        return bool(replaced)

    async def release(self) -> bool:
        """Free the lease (the next one to try takes it); whether it was still ours. Raises SharedStateDown."""
        return await delete_unchanged(self.link, self.key, self.value)

    async def keep(self, every: float) -> None:
        """Renew it every `every` seconds until it lapses (a pause longer than its expiry: someone
        else may hold it now). Raises SharedStateDown."""
        while True:
            await asyncio.sleep(every)
            if not await self.renew():
                return


async def take(link: RedisLink, key: str, value: str, ttl: float) -> HeldLease | bytes | None:
    """The lease on `key` if it was free; else the value of whoever holds it, or None when it went
    between the two looks (ask again). One round trip. Raises SharedStateDown."""
    async def set_or_get(r) -> tuple[bool, bytes | None]:
        async with r.pipeline(transaction=True) as pipe:
            taken, current = await pipe.set(key, value, nx=True, px=int(ttl * 1000)).get(key).execute()
        return bool(taken), current

    taken, current = await link.call(set_or_get)
    return HeldLease(link, key, value, ttl) if taken else current


async def delete_unchanged(link: RedisLink, key: str, value: bytes | str) -> bool:
    """Delete the lease on `key` if it still holds `value` (a holder's own, or one read from a
    holder found gone); whether it did. Raises SharedStateDown."""
    return bool(await link.call(lambda r: r.eval(_DELETE, 1, key, value)))
