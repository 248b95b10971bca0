"""Hit or miss: did a cache go upstream to answer a client's manifest or blob request?

The proxy sees both sides: the client's request to a cache, and each request that cache makes
to its upstream through the egress listener. A client request is a miss when, while it is in
flight, its cache fetches the same content (registry, repository, reference) upstream; else a hit.

What counts as fetching: any upstream request for a digest, and a GET of a tag. A HEAD of a
tag does not: registry:2 sends one for every tag request to learn the tag's current digest (a
freshness check, which Docker Hub does not count as a pull). When that HEAD answers with a
digest, the client's request is also watched under that digest, because registry:2 then
fetches the manifest by digest if it does not hold it.

Blobs are counted by their bytes: each blob GET that goes upstream makes one client request
for that blob a miss (the earliest one not yet a miss), since with single-flight spools
(spool.py) one upstream fetch serves every concurrent client, and those others got nothing from
upstream for them. Fetches served from a spool are not upstream requests (the addon does not
report them), and a blob HEAD fetches nothing.
"""

from __future__ import annotations

Key = tuple[str, str, str]  # registry name, repository, reference (tag or digest)


def is_fetch(method: str, reference: str) -> bool:
    return method != "HEAD" or ":" in reference


class InFlight:
    """Client requests in flight, by what they ask for; entries go when the request ends."""

    def __init__(self) -> None:
        self._waiting: dict[Key, dict[str, None]] = {}  # key -> ids of client flows, in arrival order
        self._keys: dict[str, set[Key]] = {}  # client flow id -> its keys
        self._missed: set[str] = set()

    def started(self, flow_id: str, registry: str, repository: str, reference: str) -> None:
        self._watch(flow_id, (registry, repository, reference))

    def upstream_request(self, registry: str, repository: str, reference: str, method: str) -> None:
        if is_fetch(method, reference):
            self._missed.update(self._waiting.get((registry, repository, reference), ()))

    def upstream_blob_fetch(self, registry: str, repository: str, digest: str) -> None:
        waiting = self._waiting.get((registry, repository, digest), ())
        if first := next((flow_id for flow_id in waiting if flow_id not in self._missed), None):
            self._missed.add(first)

    def tag_resolved(self, registry: str, repository: str, tag: str, digest: str) -> None:
        for flow_id in list(self._waiting.get((registry, repository, tag), ())):
            self._watch(flow_id, (registry, repository, digest))

    def finished(self, flow_id: str) -> str | None:
        """"hit" or "miss" for a watched client request (and forget it); None if it was not watched."""
        keys = self._keys.pop(flow_id, None)
        if keys is None:
            return None
        for key in keys:
            flows = self._waiting[key]
            flows.pop(flow_id, None)
            if not flows:
                del self._waiting[key]
        if flow_id in self._missed:
            self._missed.discard(flow_id)
            return "miss"
        return "hit"

    def __len__(self) -> int:
        return len(self._keys)

    def _watch(self, flow_id: str, key: Key) -> None:
        self._waiting.setdefault(key, {})[flow_id] = None
        self._keys.setdefault(flow_id, set()).add(key)
