"""Admin: the addon that runs the admin endpoint (/metrics, /ready, /live) beside the proxy; the
server itself and the readiness check are plain code in regcache_core/observe/admin.py."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx

from ..observe.admin import AdminServer, Answer, readiness
from ..observe.metrics import EXPOSITION_CONTENT_TYPE, Metrics
from .budget import DiskBudget
from .services import Services
from .settings import Settings

logger = logging.getLogger(__name__)


class Admin:
    """Serves /metrics, /ready and /live on REGCACHE_ADMIN_HOST:REGCACHE_ADMIN_PORT (see admin.py)."""

    def __init__(self, settings: Settings, metrics: Metrics, budget: DiskBudget, services: Services) -> None:
        self.settings = settings
        self.metrics = metrics
        self.budget = budget
        self.services = services
        self.server = AdminServer({"/metrics": self._metrics, "/ready": self._ready, "/live": self._live}, open_paths=("/live",))

    async def running(self) -> None:
        config = self.settings.config
        self.server.token = config.admin_token
        try:
            await self.server.start(config.admin_host, config.admin_port)
        except OSError as e:
            logger.error(f"regcache: admin endpoint (metrics, health) cannot listen on {config.admin_host}:{config.admin_port}: {e}")

    def done(self) -> None:
        self.server.close()

    async def _metrics(self) -> Answer:
        return Answer(200, EXPOSITION_CONTENT_TYPE, self.metrics.exposition())

    async def _ready(self) -> Answer:
        servers = list(ctx.master.addons.get("proxyserver").servers)
        proxy_serves = bool(servers) and all(server.is_running for server in servers)
        registries = self.settings.config.registries
        backends = {r.name: r.cache for r in registries if r.cache}
        disks = await asyncio.to_thread(self.budget.disk_states)
        upstreams = self.services.upstream_state.states([r.name for r in registries])
        return await readiness(proxy_serves, backends, upstreams, disks=disks,
                               shared_state=self.services.shared_state_detail())

    async def _live(self) -> Answer:
        return Answer.json(200, {"live": True})
