"""What mitmweb shows of regcache's flows: a readable label, a marker, which flows to list, and a
bounded list.

Plain functions, no mitmproxy here; the addon (mitm/web.py) applies them in its hooks. mitmweb
keeps every flow it has seen (with its buffered bodies) until told otherwise, so
`finished_flows_beyond` picks the oldest finished ones to remove. Blob bodies are never among
them: blobs are streamed, and a streamed body is not kept. (Credentials never show either:
mitm/upstream.py redacts what it injected, and clients' own are dropped on arrival.)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TypeVar

from .pull_log import PullRecord
from ..routing import Target, short_reference
from .stats import human_bytes

Flow = TypeVar("Flow")  # mitmproxy's flows: anything with `live`

# mitmweb's flow marker, an emoji short code shown at the right end of the Path column (the
# Comment column is narrow and cuts the label off): what the client got from the cache.
CACHE_MARKS = {"hit": ":green_circle:", "miss": ":large_blue_circle:", "stale": ":yellow_circle:"}
FAILURE_MARK = ":warning:"


def flow_label(target: Target | None, upstream_fetch: bool = False, record: PullRecord | None = None,
               streamed: bool = False) -> str:
    """`docker.io library/small manifest 1.0` while in flight, `200 miss · docker.io library/small
    manifest 1.0` once it ended: the outcome first, as mitmweb's Comment column is narrow (the
    Path column names the request too). A streamed body's bytes come after the outcome
    (`200 miss · 1.2 MiB · ...`): mitmweb's Size column counts stored bodies only.

    `upstream_fetch`: the flow is a cache's request to its upstream, not a client's.
    """
    if target is None:
        what = "answered by regcache"
    else:
        what = " ".join(filter(None, (target.registry.name, target.repository, target.kind, short_reference(target.reference))))
        what = f"upstream fetch: {what}" if upstream_fetch else what
    if record is None:
        return what
    outcome = f"error: {record.error}" if record.error else " ".join(filter(None, (str(record.status), record.cache)))
    return " · ".join((outcome, human_bytes(record.bytes), what) if streamed and record.bytes else (outcome, what))


def flow_marker(record: PullRecord) -> str | None:
    """The marker of a finished flow: failed, else hit, miss or stale; None for the rest."""
    if record.error or record.status >= 400:
        return FAILURE_MARK
    return CACHE_MARKS.get(record.cache or "")


def is_housekeeping(target: Target | None) -> bool:
    """Pings (`GET /v2/`: a client's before each pull, a cache's before each upstream fetch, in
    all some 40% of the flows) say nothing about pulls: mitmweb does not list them."""
    return target is not None and target.kind == "ping"


def finished_flows_beyond(flows: Iterable[Flow], count: int, max_flows: int) -> list[Flow]:
    """The oldest finished flows to drop so that at most `max_flows` of `count` stay.

    `flows` is oldest first. Live flows are never dropped: removing one would kill it.
    """
    excess = count - max_flows
    if excess <= 0:
        return []
    return list(itertools.islice((flow for flow in flows if not flow.live), excess))
