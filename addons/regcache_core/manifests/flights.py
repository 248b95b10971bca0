"""Who asks upstream about a manifest reference, when many want it at once: the first request
for a reference the cache does not hold goes to the cache, the others wait for its answer; the
first request for a stale tag revalidates it, the others take its outcome.

ReferenceFlights is what the manifest front (front.py) needs. LocalFlights is this process's;
several replicas use cluster/flights.py's, which makes it one request for the whole cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

Reference = tuple[str, str, str]  # registry name, repository, tag or digest

# Seconds a request for a reference the cache is being asked for waits for that answer, then goes
# to the cache itself: well within containerd's 30 s for response headers, and never a 503.
FIRST_WAIT = 10.0


class ReferenceFlights(Protocol):
    async def first(self, reference: Reference) -> bool:
        """True: this request asks the cache (its caller must call `answered`). False: the
        first one has answered (or FIRST_WAIT passed): plan again from what it learnt."""
        ...

    def answered(self, reference: Reference) -> None:
        """The cache answered the first request (or it failed): the waiting ones go on."""
        ...

    async def revalidation(self, key: tuple[str, ...], revalidate: Callable[[], Awaitable[str]]) -> str:
        """`revalidate()`'s outcome, run once for the requests that want it at the same time."""
        ...

    def close(self) -> None:
        """The front is done (a new config): nobody waits on this one any more."""
        ...


class LocalFlights:
    def __init__(self) -> None:
        self._asked: dict[Reference, asyncio.Event] = {}  # references at the cache, by their first request

    def asking(self, reference: Reference) -> bool:
        return reference in self._asked

    async def first(self, reference: Reference) -> bool:
        if (asked := self._asked.get(reference)) is None:
            self._asked[reference] = asyncio.Event()  # from here on, later requests wait for this one
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_WAIT):
                await asked.wait()
        return False

    def answered(self, reference: Reference) -> None:
        if (asked := self._asked.pop(reference, None)) is not None:
            asked.set()

    async def revalidation(self, key: tuple[str, ...], revalidate: Callable[[], Awaitable[str]]) -> str:
        return await revalidate()  # the front shares one task among this process's requests

    def close(self) -> None:
        for reference in list(self._asked):
            self.answered(reference)
