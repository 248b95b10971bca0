"""The request-head bound: head_over_bound's rule, and the bounded HTTP/1 server driven by hand
with the events mitmproxy's connection handler sends it (a head in pieces, a 431, what follows)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from mitmproxy import connection, version
from mitmproxy.options import Options
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import Http1Server, HTTPMode, HttpLayer, RequestEndOfMessage, RequestHeaders, RequestProtocolError
from mitmproxy.test import taddons

from regcache_core.access.head_bound import head_over_bound
from regcache_core.mitm import head_bound
from regcache_core.mitm.head_bound import (
    BoundedHttp1Server, RequestHeadBound, bound_heads, check_mitmproxy, starting_http_layer,
)
from regcache_core.observe.metrics import Metrics

HEAD = b"GET /v2/ HTTP/1.1\r\nHost: docker.io\r\n\r\n"


@pytest.mark.parametrize("held, bound, over", [
    (HEAD, len(HEAD), False),  # exactly the bound
    (HEAD, len(HEAD) - 1, True),  # its end lies past the bound
    (HEAD + b"x" * 1000, len(HEAD), False),  # a body (or the next request) after a head within the bound
    (HEAD.replace(b"\r\n", b"\n") + b"x" * 1000, len(HEAD), False),  # LF-only lines end a head too
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 100, 64, True),  # a head that has not ended
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 30, 64, False),  # not ended, but still within the bound
    (b"\r\n" * 100 + HEAD, 64, True),  # blank lines piled up before a request line end no head
    (b"\r\n" + HEAD, len(HEAD) + 2, False),  # one blank line before it, as some clients send
], ids=["at-bound", "past-bound", "body-after", "lf-only", "unended", "unended-within", "blank-lines", "one-blank-line"])
def test_head_over_bound(held, bound, over):
    assert head_over_bound(held, bound) is over


def client() -> connection.Client:
    return connection.Client(peername=("192.0.2.7", 40000), sockname=("127.0.0.1", 5000), timestamp_start=0)


def bounded_server(bound: int, refused: list) -> tuple[BoundedHttp1Server, connection.Client]:
    conn = client()
    server = BoundedHttp1Server(Context(conn, Options()), bound, refused.append)
    assert list(server.handle_event(events.Start())) == []
    return server, conn


def feed(server, conn, *pieces: bytes) -> list[commands.Command]:
    return [command for piece in pieces for command in server.handle_event(events.DataReceived(conn, piece))]


def sent(commands_: list[commands.Command]) -> bytes:
    return b"".join(c.data for c in commands_ if isinstance(c, commands.SendData))


def test_a_head_within_the_bound_in_pieces_is_parsed_as_mitmproxy_does():
    refused = []
    server, conn = bounded_server(len(HEAD), refused)
    out = feed(server, conn, HEAD[:10], HEAD[10:30], HEAD[30:])
    assert [type(c.event) for c in out if hasattr(c, "event")] == [RequestHeaders, RequestEndOfMessage] and not sent(out) and not refused


def test_a_head_past_the_bound_gets_431_then_input_is_dropped_until_the_client_closes():
    refused = []
    server, conn = bounded_server(64, refused)
    out = feed(server, conn, b"GET / HTTP/1.1\r\nX: ", b"a" * 40, b"a" * 40)
    answer = sent(out)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"Connection: close\r\n" in answer and answer.endswith(b'"the request head is larger than 64 bytes"}]}')
    assert [c.half_close for c in out if isinstance(c, commands.CloseTcpConnection)] == [True]
    assert refused == [conn] and len(server.buf) == 0  # the held bytes are let go
    assert feed(server, conn, b"a" * 10_000, b"\r\n\r\n") == [] and len(server.buf) == 0
    conn.state = connection.ConnectionState.CLOSED
    assert [type(c) for c in server.handle_event(events.ConnectionClosed(conn))] == [commands.CloseConnection]
    assert refused == [conn]


def test_bytes_sent_ahead_during_an_exchange_are_bounded_by_a_close():
    refused = []
    server, conn = bounded_server(64, refused)
    feed(server, conn, HEAD)
    assert server.state == server.wait  # the request is in, its answer is not
    out = feed(server, conn, b"GET /v2/ HTTP/1.1\r\nX: " + b"a" * 100)
    assert [type(c) for c in out] == [commands.CloseConnection] and refused == [conn] and not sent(out)
    conn.state = connection.ConnectionState.CLOSED
    failed = [c.event for c in server.handle_event(events.ConnectionClosed(conn)) if hasattr(c, "event")]
    assert [type(e) for e in failed] == [RequestProtocolError]  # the exchange under way fails, as mitmproxy fails it


def test_an_http_layer_given_the_server_uses_it_and_a_multiplexed_client_keeps_its_own():
    conn = client()
    layer = HttpLayer(Context(conn, Options()), HTTPMode.transparent)
    assert starting_http_layer(layer.context) is layer
    bound_heads(layer, 64, lambda _: None)
    assert isinstance(layer.connections[conn], BoundedHttp1Server)
    list(layer.handle_event(events.Start()))
    assert starting_http_layer(layer.context) is None  # started: nothing to give it any more

    h2 = client()
    h2.alpn = b"h2"
    layer = HttpLayer(Context(h2, Options()), HTTPMode.transparent)
    bound_heads(layer, 64, lambda _: None)
    assert h2 not in layer.connections


def test_check_mitmproxy_passes_here_and_says_why_when_the_shape_changed(monkeypatch):
    assert check_mitmproxy(Options()) is None
    monkeypatch.setattr(BoundedHttp1Server, "read_headers", Http1Server.read_headers)
    assert "not a 431" in check_mitmproxy(Options())
    monkeypatch.undo()
    monkeypatch.setattr(head_bound, "bound_heads", lambda *args: None)
    assert "not a 431" in check_mitmproxy(Options())


@pytest.mark.parametrize("broken", [None, "an over-bound head got [], not a 431"])
def test_a_mitmproxy_the_bound_cannot_work_on_is_an_error_at_load(monkeypatch, caplog, broken):
    """An error logged while mitmproxy starts makes it exit (its errorcheck addon)."""
    monkeypatch.setattr(head_bound, "check_mitmproxy", lambda options: broken)
    addon = RequestHeadBound(SimpleNamespace(loaded=lambda updated: SimpleNamespace(max_request_head=65536)), Metrics())
    with taddons.context(), caplog.at_level(logging.ERROR):
        addon.configure({"regcache_env_file"})
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    if broken is None:
        assert addon.bound == 65536 and not errors
    else:
        assert addon.bound is None and errors == [
            f"regcache: REGCACHE_MAX_REQUEST_HEAD cannot be enforced on mitmproxy {version.VERSION}, whose HTTP/1 "
            f"server is not shaped as regcache expects ({broken})"]
