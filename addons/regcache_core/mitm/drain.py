"""Drain: on SIGTERM, let pulls in flight finish before the proxy stops.

mitmproxy's own SIGTERM handler shuts down at once, cutting every transfer. This one closes the
client listener (no new connections; the egress listeners stay, so caches can finish fetching
what those pulls need), then shuts down once no client request has been in flight for QUIET
seconds (counted from the last one's end, so an idle proxy stops at once), or after
REGCACHE_STOP_GRACE seconds at the latest. A pull is several requests in a row on a kept-alive
connection, hence a quiet spell rather than the first idle moment.
"""

from __future__ import annotations

import asyncio
import signal

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ProxyMode

from ..budget import report
from .keys import TARGET
from .settings import Settings

QUIET = 1.0  # seconds without a client request in flight that end the drain


class Drain:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.in_flight: set[str] = set()  # ids of client flows not finished yet
        self.last_finished = 0.0  # event loop time the last client flow ended
        self.task: asyncio.Task | None = None

    async def running(self) -> None:
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._begin)
        except NotImplementedError:
            pass  # no loop signal handlers (Windows): mitmproxy's own stays

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if TARGET in flow.metadata:
            self.in_flight.add(flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        if flow.id in self.in_flight:
            self.in_flight.discard(flow.id)
            self.last_finished = asyncio.get_running_loop().time()

    def _begin(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self._wait_for_pulls()
        finally:
            ctx.master.shutdown()

    async def _wait_for_pulls(self) -> None:
        config = self.settings.config
        egress = [m for m in ctx.options.mode if config.egress_registry(ProxyMode.parse(m).listen_port()) is not None]
        ctx.options.update(mode=egress)  # mitmproxy stops the client listener; open connections stay
        report(f"regcache: stopping; {len(self.in_flight)} requests in flight get up to {config.stop_grace}s to finish")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.stop_grace
        while loop.time() < deadline and (self.in_flight or loop.time() - self.last_finished < QUIET):
            await asyncio.sleep(0.1)
        if self.in_flight:
            report(f"regcache: stop grace of {config.stop_grace}s over; cutting {len(self.in_flight)} requests")
