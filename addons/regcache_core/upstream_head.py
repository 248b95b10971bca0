"""HEADs regcache sends upstream itself, with its credentials: a stale tag's (manifest_front.py)
and a cold blob's for a client (mitm/cold_blobs.py). The whole exchange, a token fetch
included, is bounded by the client's timeout (REGCACHE_UPSTREAM_TIMEOUT); what the answer, or
its absence, says about the upstream and about our credentials is recorded as for every
upstream answer: metrics, up or down, the token accepted or refused."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from .config import Registry
from .metrics import Metrics
from .upstream_auth import UpstreamAuth, UpstreamAuthError
from .upstream_client import NoAnswer, UpstreamClient
from .upstream_state import UpstreamState


class HeadFailed(Exception):
    """The upstream gave no answer in time, or no token: the message says why."""


class UpstreamHeads:
    def __init__(self, client: UpstreamClient, auth: UpstreamAuth, state: UpstreamState, metrics: Metrics) -> None:
        self.client = client
        self.auth = auth
        self.state = state
        self.metrics = metrics

    async def head(self, registry: Registry, repository: str, path: str,
                   accept: str | None = None) -> tuple[int, Mapping[str, str]]:
        """Status and headers of `HEAD <upstream>/v2/<repository>/<path>`; raises HeadFailed."""
        try:
            async with asyncio.timeout(self.client.timeout):
                authorization = await self.auth.authorization(registry, repository)
                headers = {**({"Accept": accept} if accept else {}),
                           **({"Authorization": authorization} if authorization else {})}
                status, answer = await self.client.head(f"{registry.upstream}/v2/{repository}/{path}", headers)
        except UpstreamAuthError as e:
            if e.unreachable:
                self.state.went_down(registry.name, registry.upstream, e.unreachable)
            raise HeadFailed(str(e)) from None
        except (NoAnswer, TimeoutError) as e:
            reason = e.reason if isinstance(e, NoAnswer) else "timeout"
            self.metrics.upstream_result(registry.name, None)
            self.state.went_down(registry.name, registry.upstream, reason)
            raise HeadFailed(reason) from None
        self.metrics.upstream_result(registry.name, status)
        self.state.answered(registry.name, registry.upstream)
        if status == 401:
            self.auth.refused(registry, repository)
        elif status < 400:
            self.auth.accepted(registry, repository)
        return status, answer
