"""UpstreamDeadlines: a deadline for every exchange mitmproxy has with an upstream (a cache's
fetches on the egress listener, uncached registries' client requests, redirects we follow),
and the upstream state (upstream_state.py) that these exchanges show.

mitmproxy has no per-request timeout, and a flow in transit cannot be killed (flow.kill() acts
only between hooks). What it does give: the `server_connect` hook runs inside the task that
then connects and serves that server connection, and that task ends the connection cleanly
when cancelled (its flow fails, the client gets a 502). So the name is looked up here, within
the deadline (mitmproxy's own lookup has none; the TLS SNI stays the name), and the task is
cancelled when no response head has arrived by the deadline: that bounds lookup, connect and
the wait for the first byte alike. A body that has started is not cut.

While an upstream is known to be down, its requests are answered 503 at once: the caches then
serve what they hold.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

from mitmproxy import http
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from ..routing import Refusal, Target
from ..upstream.state import UpstreamState, failure_reason
from .keys import ANSWERED_HERE, DEADLINE, REDIRECT, UPSTREAM
from .router import refuse
from .settings import Settings


class UpstreamDeadlines:
    def __init__(self, settings: Settings, state: UpstreamState) -> None:
        self.settings = settings
        self.state = state
        self._waiting: dict[str, http.HTTPFlow] = {}  # client connection id -> its flow waiting for an upstream
        self._connections: dict[str, asyncio.Task] = {}  # client connection id -> task serving its server connection
        self._timers: dict[str, asyncio.TimerHandle] = {}  # flow id -> its deadline's timer

    def request(self, flow: http.HTTPFlow) -> None:
        target: Target | None = flow.metadata.get(UPSTREAM)
        if flow.response is not None or (target is None and REDIRECT not in flow.metadata):
            return
        if target is not None and (reason := self.state.reason_down(target.registry.name)):
            refuse(flow, Refusal(503, "UNAVAILABLE", f"upstream {target.registry.upstream} of {target.registry.name}"
                                                     f" cannot be reached ({reason}); regcache retries it in the background"))
            return
        timeout = self.settings.config.upstream_timeout
        flow.metadata[DEADLINE] = time.monotonic() + timeout
        self._waiting[flow.client_conn.id] = flow
        self._timers[flow.id] = asyncio.get_running_loop().call_later(timeout, self._expire, flow)

    async def server_connect(self, data: ServerConnectionHookData) -> None:
        flow = self._waiting.get(data.client.id)
        if flow is None:
            return
        host, port = data.server.address
        if not _is_ip(host):
            await self._look_up(data, flow.metadata[DEADLINE])
        if data.server.error is None:
            # Only now may the deadline cancel this task: cancelled inside a hook, it would leave
            # mitmproxy waiting for the connection forever.
            self._connections[data.client.id] = asyncio.current_task()

    async def _look_up(self, data: ServerConnectionHookData, deadline: float) -> None:
        host, port = data.server.address
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                addresses = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as e:  # the flow's error says so; failure_reason() reads it back
            data.server.error = f"name lookup failed for {host} ({failure_reason(e)})"
            return
        data.server.address = addresses[0][4][:2]  # connect to what we found; SNI stays `host`

    def server_disconnected(self, data: ServerConnectionHookData) -> None:
        if self._connections.get(data.client.id) is asyncio.current_task():
            del self._connections[data.client.id]

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self._end(flow) and (target := flow.metadata.get(UPSTREAM)) is not None and ANSWERED_HERE not in flow.metadata:
            self.state.answered(target.registry.name, target.registry.upstream)

    def error(self, flow: http.HTTPFlow) -> None:
        if not self._end(flow) or flow.response is not None:
            return
        target: Target | None = flow.metadata.get(UPSTREAM)
        if target is None or flow.error is None or flow.error.msg == flow.error.KILLED_MESSAGE:
            return
        if "client" in flow.error.msg.lower():
            return  # the requester went away: nothing said about the upstream
        if flow.metadata.get(DEADLINE) is None:  # cleared by _expire: the deadline passed
            reason = "timeout"
        else:
            reason = failure_reason(flow.error.msg)
        self.state.went_down(target.registry.name, target.registry.upstream, reason)

    def _end(self, flow: http.HTTPFlow) -> bool:
        """Stop `flow`'s deadline; False if it had none."""
        timer = self._timers.pop(flow.id, None)
        if self._waiting.get(flow.client_conn.id) is flow:
            del self._waiting[flow.client_conn.id]
        if timer is None:
            return DEADLINE in flow.metadata
        timer.cancel()
        return True

    def _expire(self, flow: http.HTTPFlow) -> None:
        self._timers.pop(flow.id, None)
        if flow.response is not None or flow.error is not None:
            return
        flow.metadata[DEADLINE] = None
        if (task := self._connections.get(flow.client_conn.id)) is not None:
            task.cancel(f"no answer from the upstream within {self.settings.config.upstream_timeout:g} s")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
