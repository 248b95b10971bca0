"""ReferenceFlights (manifests/flights.py) for the whole cluster: one upstream HEAD (and one GET
of a new digest) per manifest reference, whichever replicas its requests reach.

Within a replica, requests wait for its first one as on one node (LocalFlights). That first
one takes the reference's lease (cluster/leases.py): it asks its cache, and ends the lease once
the answer is learnt and written to the shared tag store; the other replicas' first requests
wait for that outcome, then plan again from the shared tags (their waiters with them), and
their caches read the manifest from the shared storage. A holder that dies lets its lease lapse
within seconds: a waiter takes it over. Nobody waits longer than FIRST_WAIT in all.

A stale tag is revalidated the same way: one replica's HEAD, its outcome read by the others.
While Redis is down each replica is its own cluster: it asks without a lease.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..manifests.flights import FIRST_WAIT, LocalFlights, Reference
from .leases import Lease, Leases
from .link import SharedStateDown

ANSWERED = "answered"


class SharedFlights:
    def __init__(self, leases: Leases, settled: Callable[[], Awaitable[None]]) -> None:
        self.local = LocalFlights()
        self.leases = leases
        self.settled = settled  # waits until what was learnt is in Redis: the shared tag store's flush
        self._held: dict[Reference, Lease] = {}
        self._ending: set[asyncio.Task] = set()

    async def first(self, reference: Reference) -> bool:
        if self.local.asking(reference):
            return await self.local.first(reference)  # this replica's first request speaks for it
        await self.local.first(reference)
        try:
            async with asyncio.timeout(FIRST_WAIT):
                lease = await self._lease_or_outcome("ref " + " ".join(reference))
        except SharedStateDown:
            return True
        except TimeoutError:
            lease = None
        if isinstance(lease, Lease):
            self._held[reference] = lease
            return True
        self.local.answered(reference)  # another replica answered: this one's waiters plan again too
        return False

    def answered(self, reference: Reference) -> None:
        self.local.answered(reference)
        if (lease := self._held.pop(reference, None)) is not None:
            ending = asyncio.get_running_loop().create_task(self._end(lease))
            self._ending.add(ending)
            ending.add_done_callback(self._ending.discard)

    def close(self) -> None:
        """Answers to requests planned here reach the next config's front: end what this one holds."""
        for reference in list(self._held):
            self.answered(reference)
        self.local.close()

    async def revalidation(self, key: tuple[str, ...], revalidate: Callable[[], Awaitable[str]]) -> str:
        try:
            async with asyncio.timeout(FIRST_WAIT):
                lease = await self._lease_or_outcome("revalidate " + " ".join(key))
        except (SharedStateDown, TimeoutError):
            return await revalidate()
        if isinstance(lease, str):
            return lease
        outcome = None
        try:
            outcome = await revalidate()
            return outcome
        finally:
            await lease.end(outcome)  # none if it was cancelled: the next one takes over

    async def _lease_or_outcome(self, name: str) -> Lease | str:
        """The lease, or the outcome of the replica that held it; a lease that lapsed is tried again."""
        while (lease := await self.leases.take(name)) is None:
            if (outcome := await self.leases.outcome(name)) is not None:
                return outcome
        return lease

    async def _end(self, lease: Lease) -> None:
        await self.settled()  # the waiters plan from the shared tags: they must hold the answer first
        await lease.end(ANSWERED)
