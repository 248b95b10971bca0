"""ManifestResponder: answers cached registries' manifest requests in front of the cache, and
learns tags and manifests from the cache's answers (the plain code is manifest_front.py)."""

from __future__ import annotations

from mitmproxy import http

from ..manifests.front import ManifestFront, Plan
from ..manifests.by_digest import ManifestCache
from ..observe.metrics import Metrics
from ..routing import Target
from ..manifests.tags import TagCache
from ..upstream.client import UpstreamClient
from ..upstream.state import UpstreamState
from .keys import ANSWERED_HERE, CACHE_RESULT, PLANNED, TARGET
from .router import refuse, send_to
from .settings import Settings
from .upstream import UpstreamCredentials

TAG_STORE = "tags"  # folder in the data dir


class ManifestResponder:
    def __init__(self, settings: Settings, credentials: UpstreamCredentials, upstream: UpstreamClient,
                 state: UpstreamState, metrics: Metrics) -> None:
        self.settings = settings
        self.credentials = credentials
        self.upstream = upstream
        self.state = state
        self.metrics = metrics
        self.front: ManifestFront | None = None

    def configure(self, updated: set[str]) -> None:
        config = self.settings.config
        if "regcache_env_file" in updated and config is not None:
            if self.front is not None:
                self.front.tags.close()
            self.upstream.timeout = config.upstream_timeout
            self.front = ManifestFront(TagCache(config.data_dir / TAG_STORE, config.tag_ttl),
                                       ManifestCache(config.manifest_cache_bytes), self.upstream,
                                       self.credentials.auth, self.state, self.metrics)

    async def done(self) -> None:
        self.state.close()
        if self.front is not None:
            await self.front.close()

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        target = _cached_manifest(flow)
        if target is None or flow.response is not None:
            return
        plan = await self.front.plan(target.registry, target.repository, target.reference,
                                     flow.request.headers.get_all("Accept"))
        if plan is None:
            return
        flow.metadata[PLANNED] = True
        flow.metadata[CACHE_RESULT] = plan.cache
        if plan.manifest is None:
            send_to(flow.request, target.backend, f"/v2/{target.repository}/manifests/{plan.digest}")
        else:
            flow.metadata[ANSWERED_HERE] = True
            flow.response = answer_from_memory(plan, flow.request.method)

    def response(self, flow: http.HTTPFlow) -> None:
        target = _cached_manifest(flow)
        if target is None or PLANNED in flow.metadata:
            return
        response = flow.response
        if response.status_code == 200:
            # The raw bytes: learn() keeps them only if they hash to the digest.
            body = None if flow.request.method == "HEAD" else response.raw_content
            self.front.learn(target.registry, target.repository, target.reference, response.headers, body)
        elif refusal := self.front.outage_answer(target.registry, target.reference, response.status_code):
            refuse(flow, refusal)
        self.front.answered(target.registry, target.repository, target.reference)

    def error(self, flow: http.HTTPFlow) -> None:
        target = _cached_manifest(flow)
        if target is not None and PLANNED not in flow.metadata and self.front is not None:
            self.front.answered(target.registry, target.repository, target.reference)


def answer_from_memory(plan: Plan, method: str) -> http.Response:
    headers = dict(plan.manifest.headers)
    response = http.Response.make(200, b"" if method == "HEAD" else plan.manifest.body, headers)
    if method == "HEAD":  # what a GET would send, without the body
        response.headers["Content-Length"] = str(len(plan.manifest.body))
    return response


def _cached_manifest(flow: http.HTTPFlow) -> Target | None:
    target: Target | None = flow.metadata.get(TARGET)
    if target is None or target.registry.cache is None or target.kind != "manifest":
        return None
    return target
