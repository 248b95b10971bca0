"""UpstreamRequests: every request mitmproxy sends to an upstream (a cache's fetches on the egress
listeners, uncached registries' client requests, redirects we follow) gets a deadline, our
Authorization (see upstream/auth.py) and, once it is answered or fails, its report (UpstreamAnswers:
metrics, upstream state, auth, rate limits); the answer is cleaned up before a client or cache
sees it, and the header we added is redacted.

Deadlines: mitmproxy has no per-request timeout, and a flow in transit cannot be killed
(flow.kill() acts only between hooks). What it does give: the `server_connect` hook runs inside
the task that then connects and serves that server connection, and that task ends the
connection cleanly when cancelled (its flow fails, the client gets a 502). So the name is looked
up here, within the deadline (mitmproxy's own lookup has none; the TLS SNI stays the name), and
the task is cancelled when no response head has arrived by the deadline: that bounds lookup,
connect and the wait for the first byte alike. A body that has started is not cut.

While an upstream is known to be down, its requests are answered 503 at once: the caches then
serve what they hold. A client's request that finds it down (no answer, or none by the
deadline) gets the same 503, not mitmproxy's HTML 502: written on the client's connection,
which then closes (HTTP/1; over HTTP/2 mitmproxy's own 502 stays).

Redaction: mitmweb keeps flows, and mitmproxy saves them (save_stream_file, /flows/dump), so
the header we added is redacted once the answer's headers (or an error) arrive, and when
mitmproxy stops with the request in flight; WebView keeps such a flow off its list until then.
"""

from __future__ import annotations

import asyncio
import socket
import time
import weakref

from mitmproxy import http
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from ..config import parse_ip
from ..upstream.redirects import RedirectSigner, redirect_location
from ..routing import Refusal, upstream_unreachable
from ..upstream.auth import UpstreamAuthError
from ..upstream.state import failure_reason
from .answers import answer_after_failure, refusal_answer, refuse
from .flow_notes import AnsweredBy, FlowNote, note
from .services import Services
from .settings import Settings

REDACTED = "<redacted by regcache>"


class UpstreamRequests:
    def __init__(self, settings: Settings, services: Services, signer: RedirectSigner) -> None:
        self.settings = settings
        self.services = services
        self.signer = signer
        self._waiting: dict[str, http.HTTPFlow] = {}  # client connection id -> its flow waiting for an upstream
        self._connections: dict[str, asyncio.Task] = {}  # client connection id -> task serving its server connection
        self._timers: dict[str, asyncio.TimerHandle] = {}  # flow id -> its deadline's timer
        self._carrying: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()  # flows with our header on, in flight

    async def request(self, flow: http.HTTPFlow) -> None:
        # In `request`: mitmweb's view listed the flow at `requestheaders`, without our header;
        # WebView.request unlists it now.
        flow_note = note(flow)
        target = flow_note.upstream_request
        if flow_note.answered or (target is None and flow_note.redirect is None):
            return
        if target is not None and (reason := self.services.upstream_state.reason_down(target.registry.name)):
            refuse(flow, upstream_unreachable(target.registry, reason))
            return
        self._start_deadline(flow, flow_note)
        if target is None:
            return  # a redirect's target: no credentials
        try:
            authorization = await self.services.upstream.authorization(target.registry, target.repository)
        except UpstreamAuthError as e:
            refuse(flow, Refusal(e.status, "UNAUTHORIZED" if e.status == 401 else "UNAVAILABLE", str(e)))
            return
        if authorization:
            flow.request.headers["Authorization"] = authorization
            flow_note.injected = True
            self._carrying.add(flow)

    async def server_connect(self, data: ServerConnectionHookData) -> None:
        flow = self._waiting.get(data.client.id)
        if flow is None:
            return
        host, port = data.server.address
        if parse_ip(host) is None:
            await self._look_up(data, note(flow).deadline)
        if data.server.error is None:
            # Only now may the deadline cancel this task: cancelled inside a hook, it would leave
            # mitmproxy waiting for the connection forever.
            self._connections[data.client.id] = asyncio.current_task()

    def server_disconnected(self, data: ServerConnectionHookData) -> None:
        if self._connections.get(data.client.id) is asyncio.current_task():
            del self._connections[data.client.id]

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Also for an answer made in `request` (a refusal, a 503): mitmproxy calls this hook then too.
        self._end_deadline(flow)
        self._redact(flow)
        flow_note = note(flow)
        target = flow_note.upstream_request
        answers = target or flow_note.redirect  # what a redirect of this answers
        if answers is None:
            return
        response = flow.response
        if target is not None and flow_note.answered_by is AnsweredBy.BACKEND:
            self.services.upstream.answered(target.registry, target.repository, response.status_code, response.headers)
        else:
            self.services.upstream.answered_elsewhere(answers.registry, response.status_code)
        # Clients and caches must not start a token dance of their own around us.
        response.headers.pop("WWW-Authenticate", None)
        if (location := redirect_location(response.status_code, response.headers)) is not None:
            location = self.signer.location(flow.request.url, location, answers)
            if location is None:
                del response.headers["Location"]
            else:
                response.headers["Location"] = location

    def error(self, flow: http.HTTPFlow) -> None:
        self._end_deadline(flow)
        self._redact(flow)
        flow_note = note(flow)
        answers = flow_note.upstream_request or flow_note.redirect
        if answers is None or flow.response is not None:
            return  # an answer came, and was reported
        down = failure(flow, flow_note) if flow_note.upstream_request is not None else None
        self.services.upstream.failed(answers.registry, down)
        if down is not None and flow_note.egress_for is None:
            # A client's request, not a cache's fetch (a cache reads no error page).
            answer_after_failure(flow, refusal_answer(flow.request.method, upstream_unreachable(answers.registry, down)))

    def done(self) -> None:
        # mitmproxy's Save writes the flows still in flight in its `done`, which runs after the scripts'.
        for flow in list(self._carrying):
            self._redact(flow)

    def _redact(self, flow: http.HTTPFlow) -> None:
        flow_note = note(flow)
        if flow_note.injected:
            flow_note.injected = False
            flow.request.headers["Authorization"] = REDACTED
            self._carrying.discard(flow)

    def _start_deadline(self, flow: http.HTTPFlow, flow_note: FlowNote) -> None:
        timeout = self.settings.config.upstream_timeout
        flow_note.deadline = time.monotonic() + timeout
        self._waiting[flow.client_conn.id] = flow
        self._timers[flow.id] = asyncio.get_running_loop().call_later(timeout, self._expire, flow)

    async def _look_up(self, data: ServerConnectionHookData, deadline: float) -> None:
        host, port = data.server.address
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                addresses = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as e:  # the flow's error says so; failure_reason() reads it back
            data.server.error = f"name lookup failed for {host} ({failure_reason(e)})"
            return
        data.server.address = addresses[0][4][:2]  # connect to what we found; SNI stays `host`

    def _end_deadline(self, flow: http.HTTPFlow) -> None:
        if (timer := self._timers.pop(flow.id, None)) is not None:
            timer.cancel()
        if self._waiting.get(flow.client_conn.id) is flow:
            del self._waiting[flow.client_conn.id]

    def _expire(self, flow: http.HTTPFlow) -> None:
        self._timers.pop(flow.id, None)
        if flow.response is not None or flow.error is not None:
            return
        note(flow).deadline_passed = True
        if (task := self._connections.get(flow.client_conn.id)) is not None:
            task.cancel(f"no answer from the upstream within {self.settings.config.upstream_timeout:g} s")


def failure(flow: http.HTTPFlow, flow_note: FlowNote) -> str | None:
    """Why a request sent upstream got no answer, when the upstream is to blame (it is then down);
    None when it is not: the flow was killed, or the requester went away."""
    if flow_note.deadline is None or flow.error is None or flow.error.msg == flow.error.KILLED_MESSAGE:
        return None
    if "client" in flow.error.msg.lower():
        return None  # the requester went away: nothing said about the upstream
    return "timeout" if flow_note.deadline_passed else failure_reason(flow.error.msg)
