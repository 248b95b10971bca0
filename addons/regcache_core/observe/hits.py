"""Hit, miss or stale: what did a cache's upstream do for a client's manifest or blob request?

The proxy sees both sides: the client's request to a cache, and each request that cache makes
to its upstream through the egress listener. While a client request is in flight, an upstream
answer for the same content (registry, repository, reference) decides what it was:

- a miss when the upstream sent content: a GET answered 2xx, or redirected (to a CDN, which
  the cache then fetches from through us; a 304 is not a redirect). A HEAD is no fetch (registry:2
  sends one for every tag request to learn the tag's current digest, a freshness check that
  Docker Hub does not count as a pull), nor is an answer that brought nothing (404, 304, ...);
- stale when the upstream failed (no answer, 429, 5xx) and the cache answered from its own copy;
- else a hit.

An answer that served no content (an error status, a refusal, a 404) is none of these: it
served nothing from the cache, so `regcache stats` and the metrics must not count it as a hit.

When a tag's HEAD answers with a digest, the client's request is also watched under that
digest, because registry:2 then fetches the manifest by digest if it does not hold it.

Blobs are counted by their bytes: a blob GET that brings content makes one client request
for that blob a miss (the earliest one not yet a miss), since with single-flight spools
(spool/table.py) one upstream fetch serves every concurrent client, and those others got nothing from
upstream for them. Fetches served from a spool are not upstream requests (the addon does not
report them); the spool's download, the proxy's own request, reports what it fetched
(`upstream_blob_fetch`).
"""

from __future__ import annotations

from ..upstream.redirects import REDIRECT_STATUSES

Key = tuple[str, str, str]  # registry name, repository, reference (tag or digest)


def served_content(status: int) -> bool:
    """The answer gave the client content: a 2xx, a 304 (the client's copy is current) or a
    redirect to where the content is (the data plane's 307)."""
    return 200 <= status < 300 or status == 304 or status in REDIRECT_STATUSES


def upstream_failed(status: int | None) -> bool:
    """No answer (None), rate limited or a server error: the cache falls back on its own copy."""
    return status is None or status == 429 or status >= 500


class InFlight:
    """Client requests in flight, by what they ask for; entries go when the request ends."""

    def __init__(self) -> None:
        self._waiting: dict[Key, dict[str, None]] = {}  # key -> ids of client flows, in arrival order
        self._keys: dict[str, set[Key]] = {}  # client flow id -> its keys
        self._missed: set[str] = set()
        self._failed: set[str] = set()

    def started(self, flow_id: str, registry: str, repository: str, reference: str) -> None:
        self._watch(flow_id, (registry, repository, reference))

    def upstream_answer(self, registry: str, repository: str, reference: str, method: str, status: int | None,
                        blob: bool = False) -> None:
        """The cache's upstream request for this content ended with `status` (None: no answer)."""
        flows = self._waiting.get((registry, repository, reference), {})
        if method == "GET" and status is not None and (200 <= status < 300 or status in REDIRECT_STATUSES):
            if not blob:
                self._missed.update(flows)
            else:
                self.upstream_blob_fetch(registry, repository, reference)
        elif upstream_failed(status):
            self._failed.update(flows)

    def upstream_blob_fetch(self, registry: str, repository: str, digest: str) -> None:
        """The blob's bytes came from upstream once: the earliest request for it not yet a miss is one."""
        waiting = self._waiting.get((registry, repository, digest), ())
        if first := next((flow_id for flow_id in waiting if flow_id not in self._missed), None):
            self._missed.add(first)

    def tag_resolved(self, registry: str, repository: str, tag: str, digest: str) -> None:
        for flow_id in list(self._waiting.get((registry, repository, tag), ())):
            self._watch(flow_id, (registry, repository, digest))

    def finished(self, flow_id: str, served: bool) -> str | None:
        """"hit", "miss" or "stale" for a watched client request (and forget it); None if it was
        not watched or not `served` (the client got no content: see served_content)."""
        keys = self._keys.pop(flow_id, None)
        if keys is None:
            return None
        for key in keys:
            flows = self._waiting[key]
            flows.pop(flow_id, None)
            if not flows:
                del self._waiting[key]
        missed, failed = flow_id in self._missed, flow_id in self._failed
        self._missed.discard(flow_id)
        self._failed.discard(flow_id)
        if not served:
            return None
        if missed:
            return "miss"
        return "stale" if failed else "hit"

    def __len__(self) -> int:
        return len(self._keys)

    def _watch(self, flow_id: str, key: Key) -> None:
        self._waiting.setdefault(key, {})[flow_id] = None
        self._keys.setdefault(flow_id, set()).add(key)
