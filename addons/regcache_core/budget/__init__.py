"""The caches' disk: what their registry:2 storage holds (storage.py), what clients last used
(usage.py), free space (disk.py), and eviction of the least recently used blobs when a cache
passes its budget (eviction.py). Plain code, no mitmproxy: mitm/budget.py feeds it pull
records and runs it off the event loop."""

from __future__ import annotations

import sys


def report(line: str) -> None:
    """One line for the operator, on stderr, flushed: it must show at once even when stderr is
    a pipe (mitmproxy's own log lines are not flushed)."""
    print(line, file=sys.stderr, flush=True)
