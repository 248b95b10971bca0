"""ConnectionLimits: applies client_limits.py on every listener. A connection over its
address's cap is refused in `client_connected` (mitmproxy closes it before reading a byte); one
whose request head is late is closed by a sweep once a second."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import connection, http

from ..access.limits import ClientLimits
from ..observe.log_throttle import LogThrottle, held_back
from .router import connection_writer
from .settings import Settings

logger = logging.getLogger(__name__)

SWEEP_INTERVAL = 1.0  # seconds between two looks for late request heads


class ConnectionLimits:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits: ClientLimits | None = None
        self.throttle = LogThrottle()
        self.task: asyncio.Task | None = None

    def configure(self, updated: set[str]) -> None:
        config = self.settings.config
        if "regcache_env_file" in updated and config is not None:
            self.limits = ClientLimits(config.max_client_connections, config.head_timeout)

    def running(self) -> None:
        self.task = asyncio.create_task(self._sweep())

    def done(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def client_connected(self, client: connection.Client) -> None:
        address = client.peername[0]
        if not self.limits.admit(client, address):
            client.error = "too many connections from this address"
            if (held := self.throttle.allow(address)) is not None:
                logger.warning("regcache: refused connections from %s: it holds %d already"
                               " (REGCACHE_MAX_CONNECTIONS_PER_CLIENT)%s", address, self.limits.max_per_address, held_back(held))

    def client_disconnected(self, client: connection.Client) -> None:
        self.limits.closed(client)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.limits.head_arrived(flow.client_conn)

    def response(self, flow: http.HTTPFlow) -> None:
        self.limits.exchange_ended(flow.client_conn)

    def error(self, flow: http.HTTPFlow) -> None:
        self.limits.exchange_ended(flow.client_conn)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            for client in self.limits.overdue():
                if (writer := connection_writer(client)) is not None:
                    writer.close()  # mitmproxy sees the connection end, and cleans up
