"""What mitmweb shows of regcache's flows: a readable label and a bounded list.

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
from .routing import Target, short_reference

Flow = TypeVar("Flow")  # mitmproxy's flows: anything with `live`


def flow_label(target: Target | None, upstream_fetch: bool = False, record: PullRecord | None = None) -> str:
    """`docker.io library/small manifest 1.0`, then `· 200 miss` once it is known.

    `upstream_fetch`: the flow is a cache's request to its upstream, not a client's.
    """
    if target is None:
        what = "answered by regcache"
    else:
        what = " ".join(filter(None, (target.registry.name, target.repository, target.kind, short_reference(target.reference))))
        what = f"upstream fetch: {what}" if upstream_fetch else what
    if record is None:
        return what
    outcome = f"error: {record.error}" if record.error else str(record.status)
    return f"{what} · {outcome}" + (f" {record.cache}" if record.cache else "")


def finished_flows_beyond(flows: Iterable[Flow], count: int, max_flows: int) -> list[Flow]:
    """The oldest finished flows to drop so that at most `max_flows` of `count` stay.

    `flows` is oldest first. Live flows are never dropped: removing one would kill it.
    """
    excess = count - max_flows
    if excess <= 0:
        return []
    return list(itertools.islice((flow for flow in flows if not flow.live), excess))
