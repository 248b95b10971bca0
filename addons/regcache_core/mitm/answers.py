"""Answers regcache gives itself, instead of a backend: `Answer`, made by the request path's
steps (mitm/request_path.py) and the hooks that replace a backend's answer, and `send_answer`,
which puts one on a flow (before an unread request body, where there is one)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from mitmproxy import connection, ctx, http
from mitmproxy.net.http.http1 import assemble_response, expected_http_body_size

from ..routing import PULL_METHODS, Refusal
from .flow_notes import AnsweredBy, answer_here


def body_follows(request: http.Request) -> bool:
    """True when the request announced a body that mitmproxy has not read yet."""
    if request.raw_content is not None:
        return False
    try:
        return bool(request.stream) or expected_http_body_size(request) != 0
    except ValueError:
        return True  # malformed framing: mitmproxy refuses it before any hook


@dataclass(frozen=True)
class Answer:
    """What regcache answers a request with, instead of the backend routing chose."""

    response: http.Response
    by: AnsweredBy = AnsweredBy.REGCACHE


def refusal_answer(method: str, refusal: Refusal) -> Answer:
    headers = {}
    if refusal.status == 405:
        headers["Allow"] = ", ".join(PULL_METHODS)  # RFC 9110: a 405 says which methods are allowed
    if refusal.challenge:
        headers["WWW-Authenticate"] = refusal.challenge
    return json_answer(method, refusal.status, refusal.body(), headers, close=refusal.close)


def json_answer(method: str, status: int, body: bytes, headers: dict[str, str] | None = None,
                close: bool = False) -> Answer:
    """An answer with a JSON body; a HEAD gets its headers only. mitmproxy would send the body
    after a HEAD's answer too, and the client would read it as the next answer on that
    connection. `close`: end the connection after it."""
    response = http.Response.make(status, b"" if method == "HEAD" else body,
                                  {"Content-Type": "application/json", **(headers or {})})
    response.headers["Content-Length"] = str(len(body))
    if close:
        response.headers["Connection"] = "close"  # taken off again on HTTP/2 (send_answer)
    return Answer(response)


def send_answer(flow: http.HTTPFlow, answer: Answer) -> None:
    """Answer the flow with `answer`, and note who did. A request whose body has not been read
    gets its answer before the body, and its connection closed."""
    answer_here(flow, answer.response, answer.by)
    unread_body = body_follows(flow.request)
    if multiplexed(flow):
        flow.response.headers.pop("Connection", None)  # HTTP/2 has no such header
    elif unread_body:
        flow.response.headers["Connection"] = "close"
    if unread_body:
        send_before_the_body(flow)


def refuse(flow: http.HTTPFlow, refusal: Refusal) -> None:
    send_answer(flow, refusal_answer(flow.request.method, refusal))


def answer_after_failure(flow: http.HTTPFlow, answer: Answer) -> None:
    """From an `error` hook: answer a flow whose exchange failed with `answer` instead of
    mitmproxy's HTML error page, and close the connection (the flow is killed, so mitmproxy sends
    nothing more). HTTP/1 only: on HTTP/2 and 3 mitmproxy's own answer stays."""
    if client_writer(flow) is None or not flow.killable:
        return
    answer_here(flow, answer.response, answer.by)
    flow.response.headers["Connection"] = "close"
    send_before_the_body(flow)


def send_before_the_body(flow: http.HTTPFlow) -> None:
    """Send the flow's answer now and close the connection, leaving the request body unread.

    mitmproxy answers only after reading a whole body, buffered (up to stream_large_bodies),
    crashes the connection when a body it streams meets an answer, and when a chunked body ends
    in trailers. So the answer is written on the client's connection here (HTTP/1 only, where
    nothing else is being written while a request is read) and the flow is killed, which makes
    mitmproxy close the connection (HTTP/2: reset the stream). `flow.response` stays set, for
    the pull log.
    """
    writer = client_writer(flow)
    if writer is not None:
        writer.write(assemble_response(flow.response))
        writer.close()
    flow.kill()


def client_writer(flow: http.HTTPFlow) -> asyncio.StreamWriter | None:
    """The stream writer of the flow's client connection; None where it carries other streams
    too (HTTP/2, HTTP/3: mitmproxy resets this one when the flow is killed)."""
    if multiplexed(flow):
        return None
    return connection_writer(flow.client_conn)


def connection_writer(client: connection.Client) -> asyncio.StreamWriter | None:
    """A client connection's stream writer (`Proxyserver.connections` and the handler's
    `transports`: the same in mitmproxy 11 and 12); None where there is none (tests, gone)."""
    master = getattr(ctx, "master", None)
    proxyserver = master.addons.get("proxyserver") if master else None
    handler = proxyserver.connections.get(client.id) if proxyserver else None
    transport = handler.transports.get(client) if handler else None
    writer = transport.writer if transport else None
    return writer if isinstance(writer, asyncio.StreamWriter) else None


def multiplexed(flow: http.HTTPFlow) -> bool:
    """HTTP/2 or 3, by what the connection negotiated (ALPN), never by the version a request line
    claims: `request.is_http2` is true for `GET / HTTP/2.0` sent over HTTP/1."""
    return flow.client_conn.alpn in (b"h2", b"h3")
