"""ClientAccess: only clients from REGCACHE_CLIENTS, with an account of REGCACHE_HTPASSWD when
set, reach the router (the checks are access/clients.py's). Refusals are counted in the metrics,
and logged at most once a minute per source address (a refused client repeats itself)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from mitmproxy import http

from ..access.clients import CHALLENGE, ClientNetworks, Htpasswd
from ..observe.log_throttle import LogThrottle, held_back
from ..observe.metrics import Metrics
from ..routing import Refusal
from .answers import Answer, refusal_answer
from .settings import Settings

logger = logging.getLogger(__name__)

# bcrypt gets threads of its own: a client sending wrong passwords must not occupy the default
# pool, which mitmproxy's name lookups use.
BCRYPT_THREADS = 2


class ClientAccess:
    """Refuses, on the client listener, addresses outside REGCACHE_CLIENTS (403) and requests
    without valid credentials when REGCACHE_HTPASSWD is set (401). The client's Authorization
    header is taken off the request before anything else sees it."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.networks = ClientNetworks()
        self.accounts: Htpasswd | None = None
        self.refusals = LogThrottle()  # one line per source a minute
        self._bcrypt = ThreadPoolExecutor(BCRYPT_THREADS, thread_name_prefix="regcache-bcrypt")

    def configure(self, updated: set[str]) -> None:
        if (config := self.settings.loaded(updated)) is not None:
            self.networks = ClientNetworks(config.client_networks)
            self.accounts = Htpasswd(config.htpasswd) if config.htpasswd else None

    def done(self) -> None:
        self._bcrypt.shutdown(wait=False, cancel_futures=True)

    async def check(self, flow: http.HTTPFlow) -> Answer | None:
        """A refusal for a client that may not use this regcache; None for one that may."""
        config = self.settings.config
        if config is None or config.egress_registry(flow.client_conn.proxy_mode.listen_port()) is not None:
            return None  # egress listeners admit their cache only (Router's EgressGuard)
        authorization = flow.request.headers.pop("Authorization", None)
        client = flow.client_conn.peername[0] if flow.client_conn.peername else ""
        if not self.networks.allows(client):
            self._refused(client, "network", "its address is not in REGCACHE_CLIENTS")
            return refusal_answer(flow.request.method, Refusal(403, "DENIED", f"{client} is not in the networks allowed to use this regcache"))
        if self.accounts is not None and not await self._user(authorization):
            if authorization is None:
                # The challenge every Basic client gets before it sends its credentials: counted, not logged.
                self.metrics.client_refused("no_credentials")
            else:
                self._refused(client, "credentials", "wrong user name or password (REGCACHE_HTPASSWD)")
            return refusal_answer(flow.request.method, Refusal(401, "UNAUTHORIZED", "this regcache needs a user name and password", CHALLENGE))
        return None

    def _refused(self, client: str, reason: str, why: str) -> None:
        self.metrics.client_refused(reason)
        if (held := self.refusals.allow(client)) is not None:
            logger.warning("refused client %s: %s%s", client, why, held_back(held))

    async def _user(self, authorization: str | None) -> str | None:
        if user := self.accounts.known(authorization):
            return user
        return await asyncio.get_running_loop().run_in_executor(self._bcrypt, self.accounts.verify, authorization)
