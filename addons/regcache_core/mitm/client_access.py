"""ClientAccess: only clients from REGCACHE_CLIENTS, with an account of REGCACHE_HTPASSWD when
set, reach the router (the checks are client_access.py's)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from mitmproxy import http

from ..access.clients import CHALLENGE, ClientNetworks, Htpasswd
from ..routing import Refusal
from .router import refuse
from .settings import Settings

# bcrypt gets threads of its own: a client sending wrong passwords must not occupy the default
# pool, which mitmproxy's name lookups use.
BCRYPT_THREADS = 2


class ClientAccess:
    """Refuses, on the client listener, addresses outside REGCACHE_CLIENTS (403) and requests
    without valid credentials when REGCACHE_HTPASSWD is set (401). The client's Authorization
    header is taken off the request before anything else sees it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.networks = ClientNetworks()
        self.accounts: Htpasswd | None = None
        self._bcrypt = ThreadPoolExecutor(BCRYPT_THREADS, thread_name_prefix="regcache-bcrypt")

    def configure(self, updated: set[str]) -> None:
        config = self.settings.config
        if "regcache_env_file" in updated and config is not None:
            self.networks = ClientNetworks(config.client_networks)
            self.accounts = Htpasswd(config.htpasswd) if config.htpasswd else None

    def done(self) -> None:
        self._bcrypt.shutdown(wait=False, cancel_futures=True)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        config = self.settings.config
        if config is None or config.egress_registry(flow.client_conn.proxy_mode.listen_port()) is not None:
            return  # egress listeners admit their cache only (Router's EgressGuard)
        authorization = flow.request.headers.pop("Authorization", None)
        client = flow.client_conn.peername[0] if flow.client_conn.peername else ""
        if not self.networks.allows(client):
            refuse(flow, Refusal(403, "DENIED", f"{client} is not in the networks allowed to use this regcache"))
        elif self.accounts is not None and not await self._user(authorization):
            refuse(flow, Refusal(401, "UNAUTHORIZED", "this regcache needs a user name and password", CHALLENGE))

    async def _user(self, authorization: str | None) -> str | None:
        if user := self.accounts.known(authorization):
            return user
        return await asyncio.get_running_loop().run_in_executor(self._bcrypt, self.accounts.verify, authorization)
