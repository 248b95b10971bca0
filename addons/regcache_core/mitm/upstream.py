"""UpstreamCredentials: our Authorization on flows sent upstream (see upstream_auth.py), and
upstreams' answers cleaned up before a client or cache sees them."""

from __future__ import annotations

from mitmproxy import http

from ..observe.metrics import Metrics
from ..upstream.redirects import RedirectSigner
from ..routing import Refusal, Target
from ..upstream.auth import MAX_TOKEN_RESPONSE, TokenStore, UpstreamAuth, UpstreamAuthError
from ..upstream.client import UpstreamClient
from ..upstream.signals import UpstreamSignals
from ..upstream.state import UpstreamState
from .keys import INJECTED, REDIRECT, UPSTREAM
from .router import refuse
from .settings import Settings

REDACTED = "<redacted by regcache>"
TOKEN_STORE = "upstream-tokens"  # folder in the data dir


class UpstreamCredentials:
    """Adds our Authorization to flows sent upstream, and cleans up what upstreams answer:
    no challenge reaches a client or cache, redirects are followed through us, and the header we
    added is redacted once the answer's headers (or an error) arrive: mitmweb keeps flows, and
    WebView keeps this one off its list until then."""

    def __init__(self, settings: Settings, signer: RedirectSigner, metrics: Metrics, state: UpstreamState,
                 client: UpstreamClient) -> None:
        self.settings = settings
        self.signer = signer
        self.metrics = metrics
        self.state = state
        self.auth: UpstreamAuth | None = None
        self.client = client  # token fetches and challenges; shared with the tag HEADs and probes, which close it
        self.signals = UpstreamSignals(metrics)

    def configure(self, updated: set[str]) -> None:
        config = self.settings.config
        if "regcache_env_file" in updated and config is not None:
            self._close_store()
            self.auth = UpstreamAuth(TokenStore(config.data_dir / TOKEN_STORE), self._fetch, on_token_fetch=self.metrics.token_fetch,
                                     challenge_timeout=config.upstream_timeout)

    def done(self) -> None:
        self._close_store()

    async def _fetch(self, url: str, headers: dict[str, str], timeout: float) -> tuple[int, list[str], bytes]:
        return await self.client.get(url, headers, timeout, MAX_TOKEN_RESPONSE)

    def _close_store(self) -> None:
        if self.auth:
            self.auth.store.close()

    async def request(self, flow: http.HTTPFlow) -> None:
        # In `request`: mitmweb's view listed the flow at `requestheaders`, without our header;
        # WebView.request unlists it now.
        target: Target | None = flow.metadata.get(UPSTREAM)
        if target is None or flow.response is not None:
            return
        try:
            authorization = await self.auth.authorization(target.registry, target.repository)
        except UpstreamAuthError as e:
            if e.unreachable:
                self.state.went_down(target.registry.name, target.registry.upstream, e.unreachable)
            code = "UNAUTHORIZED" if e.status == 401 else "UNAVAILABLE"
            refuse(flow, Refusal(e.status, code, str(e)))
            return
        if authorization:
            flow.request.headers["Authorization"] = authorization
            flow.metadata[INJECTED] = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)
        target: Target | None = flow.metadata.get(UPSTREAM)
        answers: Target | None = target or flow.metadata.get(REDIRECT)  # what a redirect of this answers
        if answers is None:
            return
        response = flow.response
        if target is not None:
            self.signals.observe(target.registry.name, response.status_code, response.headers)
            if response.status_code == 401:
                self.auth.refused(target.registry, target.repository)
            elif response.status_code < 400:
                self.auth.accepted(target.registry, target.repository)
        # Clients and caches must not start a token dance of their own around us.
        response.headers.pop("WWW-Authenticate", None)
        if response.status_code in (301, 302, 303, 307, 308) and "Location" in response.headers:
            location = self.signer.location(flow.request.url, response.headers["Location"], answers)
            if location is None:
                del response.headers["Location"]
            else:
                response.headers["Location"] = location

    def error(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)

    @staticmethod
    def _redact(flow: http.HTTPFlow) -> None:
        if flow.metadata.pop(INJECTED, False):
            flow.request.headers["Authorization"] = REDACTED
