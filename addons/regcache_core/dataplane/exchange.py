"""What the data plane's handlers share: the app's keys, the Exchange a handler fills in for
its request's pull record, and error answers in registry error JSON."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from ..access.clients import ClientNetworks
from ..config import Config
from ..observe.pull_log import PullRecord
from ..routing import Refusal
from .grants import Grant, GrantSigner

CONFIG = web.AppKey("config", Config)
SIGNER = web.AppKey("signer", GrantSigner)
RECORDS = web.AppKey("records", Callable[[PullRecord], None])
CLIENTS = web.AppKey("clients", ClientNetworks)  # REGCACHE_CLIENTS, parsed once
EXCHANGE = "regcache.exchange"  # request key: the Exchange a handler fills in

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Exchange:
    """What a handler learnt about its request, for the pull record."""

    started: float
    grant: Grant | None = None
    served: bool = False  # the bytes came from the cache (BACKEND, a cache hit)
    sent: int = 0
    error: str | None = None
    recorded: bool = True  # False: a cache's fetch (a spool), not a client's pull: no pull record

    def count(self, sent: int) -> None:
        self.sent += sent


def refused(refusal: Refusal) -> web.Response:
    return web.Response(status=refusal.status, body=refusal.body(), content_type="application/json")


def refuse_stranger(request: web.Request) -> web.Response | None:
    """A refusal for a client outside REGCACHE_CLIENTS: the proxy let it through its own check,
    but a data-plane URL can be handed on."""
    client = request.remote or ""
    if request.app[CLIENTS].allows(client):
        return None
    return refused(Refusal(403, "DENIED", f"{client} is not in the networks allowed to use this regcache"))


def denied() -> web.Response:
    return refused(Refusal(403, "DENIED", "not a data-plane URL issued by this regcache, or it expired"))
