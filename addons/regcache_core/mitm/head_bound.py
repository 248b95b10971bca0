"""RequestHeadBound: a bound on the request head (REGCACHE_MAX_REQUEST_HEAD) on every listener.
A client whose head grows past it gets `431` and its connection is closed, holding at most the
bound plus one read (64 KiB) of memory.

mitmproxy has no such bound, and an addon sees a request only once its head is complete, so the
check sits in mitmproxy's HTTP/1 server itself: `BoundedHttp1Server`, a subclass of its
`Http1Server` that looks at the bytes it holds unparsed after each read. mitmproxy's `HttpLayer`
takes the server a connection already has (`connections.setdefault`, as its client playback
does), so the `next_layer` hook (plain HTTP; mitmproxy's own `nextlayer` addon, which runs after
scripts, is asked to choose the layer first) or `tls_established_client` (HTTP/1 negotiated over
TLS) gives each new one ours before it starts. HTTP/2 and 3 have their own header limits.

Those are mitmproxy internals, checked at load: `check_mitmproxy` drives one through an
over-bound head and stops mitmproxy with an error if that yields no 431 (docs/security.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus

from mitmproxy import connection, ctx, tls, version
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import Http1Server, HTTPMode, HttpLayer

from ..access.head_bound import head_over_bound, head_too_large
from ..observe.log_throttle import LogThrottle, held_back
from ..observe.metrics import Metrics
from .answers import json_answer
from .settings import Settings

logger = logging.getLogger(__name__)

MULTIPLEXED_ALPNS = (b"h2", b"h3")  # served by mitmproxy's Http2Server / Http3Server, not bounded here


class BoundedHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server, with a bound on the bytes it holds for a request head: while
    it waits for one (`read_headers`), a head past the bound gets a 431, then the connection is
    half-closed and what the client still sends is dropped until it closes (or until its head
    deadline, REGCACHE_HEAD_TIMEOUT, closes it): a close with unread bytes would reset the
    connection, and the client could lose the 431. Bytes a client sends ahead while its request
    is answered (`wait`) are bounded the same way, by a close: an answer is under way there."""

    def __init__(self, context: Context, bound: int, refused: Callable[[connection.Client], None]) -> None:
        super().__init__(context)
        self.bound = bound
        self.refused = refused
        self.dropping = False  # after a 431: input is read and dropped

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if not self.dropping:
            yield from super()._handle_event(event)
        elif isinstance(event, events.ConnectionClosed):
            yield commands.CloseConnection(self.conn)

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        if self._over_bound(event):
            yield commands.SendData(self.conn, too_large_answer(self.bound))
            yield commands.CloseTcpConnection(self.conn, half_close=True)
            self.dropping = True
        else:
            yield from super().read_headers(event)

    def wait(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self._over_bound(event):
            yield commands.CloseConnection(self.conn)  # its ConnectionClosed, here too, fails the exchange
        else:
            yield from super().wait(event)

    def _over_bound(self, event: events.Event) -> bool:
        if not (isinstance(event, events.DataReceived) and len(self.buf) > self.bound):
            return False
        if not head_over_bound(bytes(self.buf), self.bound):
            return False  # a whole head within the bound, and what follows it
        self.buf.maybe_extract_at_most(len(self.buf))  # let the held bytes go
        self.refused(self.conn)
        return True


def too_large_answer(bound: int) -> bytes:
    response = json_answer("GET", 431, head_too_large(bound).body(), close=True).response
    response.reason = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE.phrase
    return assemble_response(response)


def bound_heads(http_layer: HttpLayer, bound: int, refused: Callable[[connection.Client], None]) -> None:
    """Give `http_layer`, before it starts, a bounded HTTP/1 server for its client connection;
    for HTTP/2 and 3 (by the ALPN the client negotiated) it keeps its own."""
    client = http_layer.context.client
    if client.alpn not in MULTIPLEXED_ALPNS:
        http_layer.connections.setdefault(client, BoundedHttp1Server(http_layer.context.fork(), bound, refused))


def starting_http_layer(context: Context) -> HttpLayer | None:
    """The HTTP layer of a connection's layer stack that has not started yet, if any."""
    for candidate in reversed(context.layers):
        if isinstance(candidate, HttpLayer) and context.client not in candidate.connections:
            return candidate
    return None


def check_mitmproxy(options) -> str | None:
    """Why the bound cannot work on this mitmproxy (its HTTP layer ignores the server it is
    given, or its HTTP/1 server holds what it reads elsewhere); None when it does: an over-bound
    head, given to a new HTTP layer as a client would send it, must yield a 431."""
    client = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0)
    probe = HttpLayer(Context(client, options), HTTPMode.transparent)
    try:
        bound_heads(probe, 16, lambda _: None)
        sent = [*probe.handle_event(events.Start()),
                *probe.handle_event(events.DataReceived(client, b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 16))]
    except Exception as e:  # noqa: BLE001 - any failure means the shape changed
        return f"{type(e).__name__}: {e}"
    if not any(isinstance(c, commands.SendData) and c.data.startswith(b"HTTP/1.1 431 ") for c in sent):
        return f"an over-bound head got {sent!r}, not a 431"
    return None


class RequestHeadBound:
    """Bounds every HTTP/1 connection's request heads; counts and logs (once a minute per source
    address) the clients refused."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.bound: int | None = None
        self.throttle = LogThrottle()

    def configure(self, updated: set[str]) -> None:
        if (config := self.settings.loaded(updated)) is None:
            return
        if (broken := check_mitmproxy(ctx.options)) is not None:
            # Logged as an error, which stops mitmproxy during start-up (its errorcheck addon).
            logger.error("regcache: REGCACHE_MAX_REQUEST_HEAD cannot be enforced on mitmproxy %s, whose "
                         "HTTP/1 server is not shaped as regcache expects (%s)", version.VERSION, broken)
            return
        self.bound = config.max_request_head

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if self.bound is None or nextlayer.layer is not None:
            return
        # mitmproxy's own choice, made now: its addon runs after scripts, and keeps a layer set before.
        ctx.master.addons.get("nextlayer").next_layer(nextlayer)
        if isinstance(nextlayer.layer, HttpLayer):
            bound_heads(nextlayer.layer, self.bound, self._refused)

    def tls_established_client(self, data: tls.TlsData) -> None:
        if self.bound is not None and (http_layer := starting_http_layer(data.context)) is not None:
            bound_heads(http_layer, self.bound, self._refused)

    def _refused(self, client: connection.Client) -> None:
        self.metrics.client_refused("head_too_large")
        address = client.peername[0] if client.peername else ""
        if (held := self.throttle.allow(address)) is not None:
            logger.warning("refused client %s: a request head larger than %d bytes (REGCACHE_MAX_REQUEST_HEAD)%s",
                           address, self.bound, held_back(held))
