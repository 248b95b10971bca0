"""What regcache's addons learn about a flow and hand each other: one FlowNote per flow.

Notes are kept here, beside the flow (a weak dictionary: a note goes when its flow goes), never
in `flow.metadata`: mitmproxy writes that into every saved flow (`save_stream_file`, mitmweb's
Save and /flows/dump), can write plain values only, and a Target holds its Registry, upstream
credentials included. What a saved flow should keep of regcache's view, the labels, goes into
`flow.metadata[LABELS]` as plain values (`write_labels`).
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import http

from ..config import Registry
from ..observe.pull_log import PullRecord
from ..routing import Target
from ..spool.table import Key

LABELS = "regcache"  # the flow.metadata key of a flow's plain labels


class AnsweredBy(enum.Enum):
    """Who answers a flow. BACKEND until something else takes it on."""

    BACKEND = "backend"  # where routing sent it: a cache, an upstream, a redirect's target
    CACHE_BY_DIGEST = "cache by digest"  # a manifest asked of the cache by the digest regcache knows for its tag
    REGCACHE = "regcache"  # made here: a refusal, a ping, a manifest from memory, a small blob from storage
    DATA_PLANE = "data plane"  # a client's 307 to a warm blob on the data plane
    SPOOL = "spool"  # a cache's blob fetch sent to a spool, or a blob HEAD answered from what spools know


@dataclass(eq=False)
class FlowNote:
    client_host: str = ""  # the Host header as the client (or a cache) sent it; routing rewrites it
    client_path: str | None = None  # path and query as sent; None once the flow shows them again (mitm/web.py)
    target: Target | None = None  # a client request's routing decision
    egress_for: Registry | None = None  # the registry whose egress listener the flow came in on
    egress: Target | None = None  # what a cache asked its upstream for
    upstream: Target | None = None  # routed to an upstream, to go with our credentials
    redirect: Target | None = None  # the Target whose upstream answer redirected the flow we follow
    answered_by: AnsweredBy = AnsweredBy.BACKEND
    injected: bool = False  # the request's Authorization header is ours, not redacted yet
    in_flight: bool = False  # counted in the in-flight gauge, not finished yet
    cold_blob: bool = False  # a client's GET or HEAD of a blob its cache does not hold (mitm/cold_blobs.py)
    head_flight: Key | None = None  # the spool key of a blob HEAD that goes upstream for concurrent ones
    deadline: float | None = None  # monotonic time by which the upstream must answer
    deadline_passed: bool = False
    upstream_answer_seen: bool = False  # HitMarker has counted this egress flow's answer
    byte_counter: Callable[[bytes], bytes] | None = None  # counts a streamed body (recorder.ByteCounter)
    cache: str | None = None  # "hit", "miss" or "stale", once the cache's upstream use is known
    record: PullRecord | None = None  # once the flow ended

    @property
    def answered(self) -> bool:
        """Answered (or about to be) by something other than the backend routing chose."""
        return self.answered_by not in (AnsweredBy.BACKEND, AnsweredBy.CACHE_BY_DIGEST)

    @property
    def upstream_request(self) -> Target | None:
        """The Target of a request routed upstream with our credentials, unless a spool took it
        on. An answer regcache made for it (a refusal, a 503 while the upstream is down) counts
        as that upstream's answer in the metrics and the hit marks."""
        return None if self.answered_by is AnsweredBy.SPOOL else self.upstream

    def labelled(self) -> tuple[Target | None, bool]:
        """What a flow's label names: its client request, or the upstream fetch of a cache."""
        if self.egress is not None:
            return self.egress, True
        return self.target, False


_notes: weakref.WeakKeyDictionary[http.HTTPFlow, FlowNote] = weakref.WeakKeyDictionary()


def note(flow: http.HTTPFlow) -> FlowNote:
    """The flow's note, made on first use."""
    found = _notes.get(flow)
    if found is None:
        found = _notes[flow] = FlowNote()
    return found


def answer_here(flow: http.HTTPFlow, response: http.Response, by: AnsweredBy = AnsweredBy.REGCACHE) -> None:
    """Answer a flow without its backend, and note who did."""
    flow.response = response
    note(flow).answered_by = by


def write_labels(flow: http.HTTPFlow) -> None:
    """Put what regcache knows of the flow in `flow.metadata[LABELS]`, as plain values a saved
    flow keeps: registry, repository, kind, reference, whether it is a cache's upstream fetch,
    who answered, and once it ended, the cache's outcome, status and bytes sent."""
    flow_note = note(flow)
    target, upstream_fetch = flow_note.labelled()
    labels: dict = {"answered_by": flow_note.answered_by.value}
    if target is not None:
        labels.update(registry=target.registry.name, repository=target.repository, kind=target.kind,
                      reference=target.reference, upstream_fetch=upstream_fetch)
    if (record := flow_note.record) is not None:
        labels.update(cache=record.cache, status=record.status, bytes=record.bytes, error=record.error)
    elif flow_note.cache is not None:
        labels["cache"] = flow_note.cache
    flow.metadata[LABELS] = labels
