"""Blob HEADs on the egress listeners, answered without the upstream where the answer is known.

registry:2 asks its upstream for a blob's size (a HEAD) before every fetch of a blob it does not
hold, so N concurrent cold pulls made N upstream HEADs besides the one GET (spool/table.py). What a
blob's HEAD answers is fixed by the blob, whose digest names its bytes: 200 with its
Content-Length, Docker-Content-Digest and Content-Type (the distribution spec's "Checking if
content exists"). So on an egress listener:

- a HEAD of a blob with a spool (its download got a 200 for this registry and repository) is
  answered from that 200's headers; one whose download has no answer yet waits for it;
- a HEAD of a blob with no spool while another HEAD of it is in flight upstream waits for that
  one's answer, and gets the same if it was a 200 naming that digest and a size; such an answer
  is remembered for KNOWN_FOR seconds (registry:2 sends its GET right after its HEAD, and HEADs
  of other pulls that come in between would go upstream again);
- anything else goes upstream, as before: a 404, a 401 and an error are the upstream's to say.

Keys are (registry, repository, digest), as spools': the upstream said the blob is in that
repository, for our credentials, and nothing about others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from .table import Key, SpoolTable

HEAD_WAIT = 10.0  # seconds a HEAD waits for a concurrent one's answer, then goes upstream itself
KNOWN_FOR = 30.0  # seconds an upstream's 200 to a blob HEAD answers the HEADs that come after it


@dataclass(frozen=True)
class BlobHead:
    """A blob HEAD's answer, as the upstream gave it."""

    digest: str
    size: int
    content_type: str

    def headers(self) -> dict[str, str]:
        return {"Content-Length": str(self.size), "Content-Type": self.content_type,
                "Docker-Content-Digest": self.digest, "Docker-Distribution-API-Version": "registry/2.0"}


def blob_head(digest: str, status: int | None, headers: Mapping[str, str]) -> BlobHead | None:
    """The answer an upstream's HEAD of `digest` gave, if it says the blob is there and what it is."""
    size = headers.get("Content-Length", "")
    if status != 200 or headers.get("Docker-Content-Digest") != digest or not (size.isascii() and size.isdigit()):
        return None
    return BlobHead(digest, int(size), headers.get("Content-Type", "application/octet-stream"))


class HeadFlights:
    """The blob HEADs in flight upstream, and the 200s they got lately, by key. Lives on the
    proxy's event loop."""

    def __init__(self, spools: SpoolTable, wait: float = HEAD_WAIT, known_for: float = KNOWN_FOR) -> None:
        self.spools = spools
        self.wait, self.known_for = wait, known_for
        self._flights: dict[Key, asyncio.Future] = {}
        self._known: dict[Key, BlobHead] = {}

    async def answer(self, key: Key) -> tuple[BlobHead | None, bool]:
        """(the known answer, or None: go upstream; whether this HEAD goes upstream for the others:
        it then reports its answer with `answered`)."""
        spool = self.spools.get(key)
        if spool is not None and await self.spools.follow(spool):
            return BlobHead(key[2], spool.size, spool.content_type), False
        if (known := self._known.get(key)) is not None:
            return known, False
        if (flight := self._flights.get(key)) is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(flight), self.wait), False
            except asyncio.TimeoutError:
                return None, False
        self._flights[key] = asyncio.get_running_loop().create_future()
        return None, True

    def answered(self, key: Key, status: int | None, headers: Mapping[str, str]) -> None:
        """The upstream answered the HEAD that went for the others (None: it got no answer)."""
        if (flight := self._flights.pop(key, None)) is None:
            return
        head = blob_head(key[2], status, headers)
        flight.set_result(head)
        if head is not None:
            self._known[key] = head
            asyncio.get_running_loop().call_later(self.known_for, self._known.pop, key, None)

    def __len__(self) -> int:
        return len(self._flights) + len(self._known)
