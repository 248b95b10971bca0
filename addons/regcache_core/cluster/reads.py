"""Reads in flight of the whole cluster: which stored blobs some replica is sending right now, so
that the disk budget, run by one replica over the storage they all share, never evicts a blob
another replica reads (on a shared filesystem another node's open file can vanish under it; on
an object store a deleted object cannot be read further).

Each process that sends stored blobs (the proxy, each data-plane worker) registers them, per
blob a sorted set `regcache:reading:<registry>@<digest>` whose members are the readers (a token
of each process) scored by a deadline: READ_TTL seconds after the reader's last renewal, on
Redis's own clock (replicas' clocks may differ). A process renews all its reads in one round
trip every RENEW_EVERY seconds while they last, and removes its member when its last read of
the blob ends. A reader that dies renews no more: its deadline passes, the evicting replica
counts it no more, and the key itself expires READ_TTL after the last renewal of any reader.

A URL of a blob handed to a client (a presigned one of the object store, or the data plane's) is
a read too, for as long as the URL is valid: the client may read the object from the store
without any replica in between. The proxy registers it as a member of its own (`<token>:url`)
with a deadline URL_MARGIN seconds past the URL's end, and registers the blob again only for a
URL that would outlast that deadline: so every URL is covered to its end, and a rollout whose
nodes all pull one layer costs one Redis call per blob and URL_MARGIN, not one per pull.

Redis down: registering and renewing are skipped (each process's reads are registered again at
the first renewal Redis answers) and the budget checks only its own replica's reads, as one node.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator

from ..deadlines import Deadlines
from .link import RedisLink, SharedStateDown

PREFIX = "regcache:reading:"
READ_TTL = 6.0  # seconds a read stays registered past its reader's last renewal
RENEW_EVERY = 2.0  # seconds between renewals: a few chances before the deadline
URL_MARGIN = 60.0  # seconds a handed-out URL's registration outlasts the URL: later URLs within them need none

Blob = tuple[str, str]  # registry name, digest

# KEYS: the blobs' sets; ARGV: the reader, the time it reads for in ms (READ_TTL, or a handed-out
# URL's life plus URL_MARGIN). Each blob's deadline for this reader is Redis's time plus that, and its key lives
# as long as its latest deadline (never shortened: a URL's deadline outlasts the reads' renewals).
_REGISTER = """
local now = redis.call('TIME')
local ttl = tonumber(ARGV[2])
local deadline = now[1] * 1000 + math.floor(now[2] / 1000) + ttl
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, deadline, ARGV[1])
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
return 1
"""
# KEYS[1]: a blob's set. Drops the readers whose deadline passed; how many are left.
_READERS = """
local now = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now[1] * 1000 + math.floor(now[2] / 1000))
return redis.call('ZCARD', KEYS[1])
"""


def reads_key(blob: Blob) -> str:
    registry, digest = blob
    return f"{PREFIX}{registry}@{digest}"


class ClusterReads:
    """This process's reads of stored blobs, registered for the cluster while they last."""

    def __init__(self, link: RedisLink, ttl: float = READ_TTL, renew_every: float = RENEW_EVERY,
                 url_margin: float = URL_MARGIN) -> None:
        self.link = link
        self.reader = secrets.token_hex(8)
        self.ttl_ms = int(ttl * 1000)
        self.renew_every = renew_every
        self.url_margin = url_margin
        # Blob -> monotonic time until which its URLs' registration holds in Redis, at the least:
        # taken before the call, whose deadline Redis counts from when it runs it, later.
        self._urls = Deadlines()
        self._urls_outages = link.outages  # a registration made before Redis went away may be lost with it
        self.reading: Counter[Blob] = Counter()
        # One change reaches Redis at a time, and each writes what `reading` says then: a read
        # that starts again while the end of the last one is on its way is never left unregistered.
        self._writing = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()  # writes and the renewal, kept: tasks are weakly held
        self._renewal: asyncio.Task | None = None  # from the first read on
        self._closed = False

    @contextlib.asynccontextmanager
    async def read(self, registry: str, digest: str) -> AsyncIterator[None]:
        """Around a send of a stored blob: registered before it starts (within the link's deadline;
        not at all while Redis is down), unregistered after it ends."""
        blob = (registry, digest)
        self.reading[blob] += 1
        try:
            if self.reading[blob] == 1:
                self._renewing()
                await self._write(blob)
            yield
        finally:
            self.ended(blob)

    def started(self, registry: str, digest: str) -> None:
        """A send began (for hooks that cannot wait): registered soon."""
        blob = (registry, digest)
        self.reading[blob] += 1
        if self.reading[blob] == 1:
            self._renewing()
            self._later(self._write(blob))

    def handed_out(self, registry: str, digest: str, valid_for: float) -> None:
        """A URL of the blob went to a client, who may read it (from the object store, past every
        replica) for `valid_for` seconds: registered as a read at least that long, soon (for hooks
        that cannot wait), unless a registration on its way or made already covers it; not at
        all while Redis is down."""
        now = time.monotonic()
        # A registration that failed marked Redis down too: the next URL registers again (those
        # handed out while it was on its way are this replica's only, as while Redis is down).
        if self.link.outages != self._urls_outages:
            self._urls.clear()
            self._urls_outages = self.link.outages
        self._urls.drop_expired(now)
        blob = (registry, digest)
        if self._urls.until(blob) >= now + valid_for or not self.link.up:
            return
        registered_for = valid_for + self.url_margin
        self._urls.set(blob, now + registered_for)
        self._later(self._register_once(reads_key(blob), f"{self.reader}:url", int(registered_for * 1000)))

    def ended(self, blob: Blob) -> None:
        self.reading[blob] -= 1
        if self.reading[blob] <= 0:
            del self.reading[blob]
            self._later(self._write(blob))

    async def read_anywhere(self, registry: str, digest: str) -> bool:
        """Whether any replica is reading the blob now. Raises SharedStateDown."""
        return bool(await self.link.call(lambda r: r.eval(_READERS, 1, reads_key((registry, digest)))))

    def close(self) -> None:
        """Stop renewing: this process's entries expire by themselves (sends still under way,
        from before a configuration changed, are not told to Redis any more)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()

    async def _write(self, blob: Blob) -> None:
        """Tell Redis whether this process reads `blob`, as `reading` says now."""
        with contextlib.suppress(SharedStateDown):
            async with self._writing:
                key = reads_key(blob)
                if blob in self.reading:
                    await self.link.call(lambda r: r.eval(_REGISTER, 1, key, self.reader, self.ttl_ms))
                else:
                    await self.link.call(lambda r: r.zrem(key, self.reader))

    async def _register_once(self, key: str, member: str, ttl_ms: int) -> None:
        with contextlib.suppress(SharedStateDown):
            await self.link.call(lambda r: r.eval(_REGISTER, 1, key, member, ttl_ms))

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.renew_every)
            with contextlib.suppress(SharedStateDown):
                async with self._writing:
                    if keys := [reads_key(blob) for blob in self.reading]:
                        await self.link.call(lambda r: r.eval(_REGISTER, len(keys), *keys, self.reader, self.ttl_ms))

    def _renewing(self) -> None:
        if self._renewal is None:
            self._renewal = self._later(self._renew())

    def _later(self, call) -> asyncio.Task | None:
        if self._closed:  # its link is closed too
            call.close()
            return None
        task = asyncio.get_running_loop().create_task(call)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
