"""Drain: on SIGTERM (or Ctrl-C), let pulls in flight finish before the proxy stops.

mitmproxy's own SIGTERM handler shuts down at once, cutting every transfer. This one closes the
client listener (no new connections; the egress listeners stay, so caches can finish fetching
what those pulls need), then shuts down once no client request has been in flight for QUIET
seconds (counted from the last one's end, so an idle proxy stops at once) and no download of a
cold blob is under way (clients read its spool from the data plane, which stops after the
proxy), or after REGCACHE_STOP_GRACE seconds at the latest. A pull is several requests in a row on a kept-alive
connection, hence a quiet spell rather than the first idle moment.

Then, before mitmproxy shuts down, it closes the connections still open (a cache's idle
keep-alive to its egress listener, a client's), while every addon can still see them go:
asyncio.run would cancel their tasks as it ends, and Python before 3.13 prints a CancelledError
traceback for each (asyncio's stream callback asks a cancelled task for its exception; seen on
3.11.7 and 3.12.1, with mitmproxy 11.0 and 12.3). Ctrl-C (SIGINT) drains the same way.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ProxyMode

from ..budget import report
from .flow_notes import note
from .settings import Settings

QUIET = 1.0  # seconds without a client request in flight that end the drain
CLOSE_TIMEOUT = 2.0  # seconds the connections left at the end get to close


class Drain:
    def __init__(self, settings: Settings, downloads_running: Callable[[], int]) -> None:
        self.settings = settings
        self.downloads_running = downloads_running  # the services'
        self.in_flight: set[str] = set()  # ids of client flows not finished yet
        self.last_finished = 0.0  # event loop time the last client flow ended
        self.task: asyncio.Task | None = None

    async def running(self) -> None:
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(signum, self._begin)
        except NotImplementedError:
            pass  # no loop signal handlers (Windows): mitmproxy's own stays

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if note(flow).target is not None:
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
            await self._close_connections()
            ctx.master.shutdown()

    async def _wait_for_pulls(self) -> None:
        config = self.settings.config
        egress = [m for m in ctx.options.mode if config.egress_registry(ProxyMode.parse(m).listen_port()) is not None]
        ctx.options.update(mode=egress)  # mitmproxy stops the client listener; open connections stay
        if self.in_flight or self.downloads_running():  # an idle proxy stops at once, and quietly
            report(f"regcache: stopping; {len(self.in_flight)} requests in flight and {self.downloads_running()} "
                   f"downloads get up to {config.stop_grace}s to finish")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.stop_grace
        while loop.time() < deadline and (self.in_flight or self.downloads_running()
                                          or loop.time() - self.last_finished < QUIET):
            await asyncio.sleep(0.1)
        if self.in_flight or self.downloads_running():
            report(f"regcache: stop grace of {config.stop_grace}s over; cutting {len(self.in_flight)} requests and "
                   f"{self.downloads_running()} downloads")

    async def _close_connections(self) -> None:
        connections = ctx.master.addons.get("proxyserver").connections
        for handler in list(connections.values()):
            # As mitmproxy ends a connection whose client left: its reading task is cancelled,
            # and the connection's own task then ends normally.
            if (client := handler.transports.get(handler.client)) and client.handler:
                client.handler.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_TIMEOUT
        while connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
