"""The bound on a request head (REGCACHE_MAX_REQUEST_HEAD): plain logic, applied to the bytes
mitmproxy's HTTP/1 server holds unparsed (mitm/head_bound.py).

mitmproxy keeps a connection's bytes until a blank line ends the head, with no size limit, so
a client sending a head that never ends makes the proxy hold all of it (1.13 GiB of RSS for a
256 MiB head). A head is over the bound when the bytes held reach past it with no end of head
within its first `bound` bytes.
"""

from __future__ import annotations

import re

from ..routing import Refusal

# Where a head ends: a blank line, LF or CRLF terminated (h11's rule, which mitmproxy parses by).
_HEAD_END = re.compile(rb"\n\r?\n")


def head_over_bound(unparsed: bytes, bound: int) -> bool:
    """True when `unparsed`, the bytes held for the next request head, can no longer hold a head
    of at most `bound` bytes. Blank lines before a request line count as held bytes but cannot
    end a head: mitmproxy drops only one of them per read, so they would pile up unbounded."""
    if len(unparsed) <= bound:
        return False
    window = unparsed[:bound]
    start = len(window) - len(window.lstrip(b"\r\n"))
    return _HEAD_END.search(window, start) is None


def head_too_large(bound: int) -> Refusal:
    return Refusal(431, "UNSUPPORTED", f"the request head is larger than {bound} bytes", close=True)
