"""Leases on the shared Redis (lease.py) for things one replica at a time does for the whole
cluster (asks upstream about a cold reference, revalidates a tag, runs the disk budget), while
the others wait for what it found.

A lease lives LEASE_TTL seconds past its holder's last renewal (every third of it), so a holder
that dies loses it within LEASE_TTL and a waiter takes over. The holder ends it with an outcome
(a short text, kept DONE_LINGER seconds for the waiters to read) or none (the key goes: the next
one to try takes it). Waiters poll the key every POLL seconds: a cold fetch takes tens of
milliseconds at least, and polling needs no connection of its own nor messages that a
reconnection could lose.

While Redis is down every call raises SharedStateDown at once and callers do the thing
themselves, as one replica would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket

from . import lease
from .link import RedisLink, SharedStateDown

PREFIX = "regcache:lease:"
LEASE_TTL = 3.0  # seconds a lease outlives its holder
# Seconds an outcome stays readable: enough for the waiters polling now (POLL apart, each look
# within the link's deadline), and short because a replica that finds it later takes it as fresh:
# a revalidation's outcome read 5 s on stretched a 3 s tag TTL to 8.
DONE_LINGER = 1.0
POLL = 0.05  # seconds between a waiter's looks

_HELD = "held "
_DONE = "done "


def replica_id() -> str:
    """This process, among the replicas: host name, pid and a random part (pids repeat across hosts and restarts)."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


class Lease:
    """Held by this replica until `end`; renewed meanwhile."""

    def __init__(self, held: lease.HeldLease) -> None:
        self.held = held
        self._renewal = asyncio.get_running_loop().create_task(self._renew())

    async def end(self, outcome: str | None = None) -> None:
        """Stop renewing; leave `outcome` for the waiters, or free the lease. Never raises: a
        lease that cannot be ended lapses by itself."""
        self._renewal.cancel()
        with contextlib.suppress(SharedStateDown):
            if outcome is None:
                await self.held.release()
            else:
                await self.held.replace(_DONE + outcome, DONE_LINGER)

    async def _renew(self) -> None:
        with contextlib.suppress(SharedStateDown):
            await self.held.keep(self.held.ttl / 3)


class Leases:
    def __init__(self, link: RedisLink, owner: str, ttl: float = LEASE_TTL) -> None:
        self.link = link
        self.holder = _HELD + owner
        self.ttl = ttl

    async def take(self, name: str) -> Lease | None:
        """The lease on `name` for this replica, or None while another holds it (or its outcome
        lingers). Raises SharedStateDown."""
        taken = await lease.take(self.link, PREFIX + name, self.holder, self.ttl)
        return Lease(taken) if isinstance(taken, lease.HeldLease) else None

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
