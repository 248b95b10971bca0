"""Who may use an egress listener: only the cache of that listener's registry.

An egress listener sends pulls upstream with our credentials, so it must not become a second,
unlogged way in for clients. Natively it is bound to loopback; in docker compose it listens on
the internal network, where only the caches are, but it is bound to every interface of the
proxy's container. So each egress request is also checked against the addresses that the
registry's cache URL resolves to (127.0.0.1 natively, the cache container's address in
compose). Addresses are looked up again after a short while: containers restart with new ones.

Loopback addresses count as one: when the cache is on this machine's loopback, a client on any
loopback address (127.0.0.0/8 or ::1) is this machine too, and may be the cache: with
REGCACHE_EGRESS_HOST=:: the cache connects from ::1 although its URL names 127.0.0.1. (Any
process of this machine can reach a loopback listener anyway; the guard keeps other hosts out.)
"""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import urlsplit

from ..config import Registry, parse_ip

LOOKUP_TTL = 30.0  # seconds an answer is trusted


class EgressGuard:
    def __init__(self, ttl: float = LOOKUP_TTL, clock=time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._known: dict[str, tuple[float, frozenset[str]]] = {}  # cache host -> (when, addresses)

    async def allows(self, registry: Registry, client_ip: str) -> bool:
        """True when `client_ip` is an address of `registry`'s cache."""
        if registry.cache is None:
            return False
        client = normalize(client_ip)
        addresses = await self._addresses(urlsplit(registry.cache).hostname)
        return client in addresses or (is_loopback(client) and any(map(is_loopback, addresses)))

    async def _addresses(self, host: str) -> frozenset[str]:
        now = self._clock()
        known = self._known.get(host)
        if known and now - known[0] < self._ttl:
            return known[1]
        try:
            answers = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
            addresses = frozenset(normalize(answer[4][0]) for answer in answers)
        except OSError:
            addresses = frozenset()  # not resolvable (yet): nobody is that cache
        self._known[host] = (now, addresses)
        return addresses


def is_loopback(address: str) -> bool:
    return (parsed := parse_ip(address)) is not None and parsed.is_loopback


def normalize(address: str) -> str:
    """One spelling per address: IPv4-mapped IPv6 (::ffff:10.0.0.5) as IPv4, scope ids dropped."""
    parsed = parse_ip(address)
    return address if parsed is None else str(parsed)
