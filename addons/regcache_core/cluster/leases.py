"""Leases on the shared Redis: one replica at a time does a thing for the whole cluster (asks
upstream about a cold reference, revalidates a tag, runs the disk budget), the others wait for
what it found.

A lease is a key set if absent with an expiry (SET NX PX), renewed while its holder works, so a
holder that dies loses it within LEASE_TTL seconds and a waiter takes over. The holder ends it
with an outcome (a short text, kept DONE_LINGER seconds for the waiters to read) or none (the
key goes: the next one to try takes it). Waiters poll the key every POLL seconds: a cold fetch
takes tens of milliseconds at least, and polling needs no connection of its own nor messages
that a reconnection could lose.

Every call goes through the link (cluster/link.py): while Redis is down they raise SharedStateDown
at once and callers do the thing themselves, as one replica would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket

from .link import RedisLink, SharedStateDown

PREFIX = "regcache:lease:"
LEASE_TTL = 3.0  # seconds a lease outlives its holder
DONE_LINGER = 5.0  # seconds an outcome stays readable
POLL = 0.05  # seconds between a waiter's looks

_HELD = "held "
_DONE = "done "

# Renew or end the lease only while this holder still has it: once it lapsed, another may hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_END = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


def replica_id() -> str:
    """This process, among the replicas: host name, pid and a random part (pids repeat across hosts and restarts)."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


class Lease:
    """Held by this replica until `end`; renewed meanwhile."""

    def __init__(self, leases: Leases, key: str) -> None:
        self._leases = leases
        self.key = key
        self._renewal = asyncio.get_running_loop().create_task(self._renew())

    async def end(self, outcome: str | None = None) -> None:
        """Stop renewing; leave `outcome` for the waiters, or free the lease. Never raises: a
        lease that cannot be ended lapses by itself."""
        self._renewal.cancel()
        leases = self._leases
        ended = "" if outcome is None else _DONE + outcome
        with contextlib.suppress(SharedStateDown):
            await leases.link.call(lambda r: r.eval(_END, 1, self.key, leases.holder, ended, int(DONE_LINGER * 1000)))

    async def _renew(self) -> None:
        leases = self._leases
        with contextlib.suppress(SharedStateDown):
            while True:
                await asyncio.sleep(leases.ttl / 3)
                if not await leases.link.call(lambda r: r.eval(_RENEW, 1, self.key, leases.holder, leases.ttl_ms)):
                    return  # lapsed (a pause longer than the TTL): someone else may hold it now


class Leases:
    def __init__(self, link: RedisLink, owner: str, ttl: float = LEASE_TTL) -> None:
        self.link = link
        self.holder = _HELD + owner
        self.ttl = ttl

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    async def take(self, name: str) -> Lease | None:
        """The lease on `name` for this replica, or None while another holds it (or its outcome
        lingers). Raises SharedStateDown."""
        key = PREFIX + name
        if await self.link.call(lambda r: r.set(key, self.holder, nx=True, px=self.ttl_ms)):
            return Lease(self, key)
        return None

    async def outcome(self, name: str) -> str | None:
        """Wait while another replica holds the lease on `name`: its outcome, or None when the
        lease is free (ended without one, or lapsed: its holder is gone). Bound it with a
        timeout; raises SharedStateDown."""
        key = PREFIX + name
        while True:
            value = await self.link.call(lambda r: r.get(key))
            if value is None:
                return None
            if (text := value.decode()).startswith(_DONE):
                return text[len(_DONE):]
            await asyncio.sleep(POLL)
