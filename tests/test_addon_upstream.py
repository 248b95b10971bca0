"""The addon's upstream side on mitmproxy test flows: injection, redaction, clean answers."""

from __future__ import annotations

import asyncio

from mitmproxy.test import tflow, tutils

from regcache_core.mitm.keys import INJECTED, UPSTREAM
from regcache_core.mitm.upstream import REDACTED, UpstreamCredentials
from regcache_core.config import Registry
from regcache_core.observe.metrics import Metrics
from regcache_core.upstream.redirects import RedirectSigner
from regcache_core.routing import Target
from regcache_core.upstream.client import UpstreamClient
from regcache_core.upstream.state import UpstreamState

HUB = Registry("DOCKERHUB", "docker.io", "https://registry-1.docker.io", "http://127.0.0.1:5001", "me", "pw")
BLOB = "sha256:" + "a" * 64


class FixedAuth:
    def __init__(self):
        self.refusals = []

    async def authorization(self, registry, repository):
        return "Bearer secret-token"

    def refused(self, registry, repository):
        self.refusals.append((registry.name, repository))

    def accepted(self, registry, repository):
        pass


def credentials(signer: RedirectSigner) -> UpstreamCredentials:
    metrics = Metrics()
    return UpstreamCredentials(settings=None, signer=signer, metrics=metrics, state=UpstreamState(metrics, probe=None),
                               client=UpstreamClient())


def upstream_flow(status: int, headers: dict) -> tuple:
    signer = RedirectSigner()
    addon = credentials(signer)
    addon.auth = FixedAuth()
    flow = tflow.tflow()
    flow.request.headers["Authorization"] = "Basic client-credentials"
    flow.metadata[UPSTREAM] = Target(HUB, "blob", "library/small", BLOB, f"/v2/library/small/blobs/{BLOB}")
    asyncio.run(addon.request(flow))
    assert flow.request.headers.get_all("Authorization") == ["Bearer secret-token"] and flow.metadata[INJECTED]
    flow.response = tutils.tresp(status_code=status, headers=tuple((k.encode(), v.encode()) for k, v in headers.items()))
    addon.responseheaders(flow)
    return addon, signer, flow


def test_injected_header_is_redacted_once_sent_and_challenges_never_pass():
    addon, _, flow = upstream_flow(401, {"WWW-Authenticate": 'Bearer realm="https://auth.example/token"'})
    assert flow.request.headers["Authorization"] == REDACTED
    assert "WWW-Authenticate" not in flow.response.headers
    assert addon.auth.refusals == [("docker.io", "library/small")]


def test_redirect_is_rewritten_to_a_signed_path_on_the_proxy():
    _, signer, flow = upstream_flow(307, {"Location": "https://cdn.example/blob?sig=1"})
    location = flow.response.headers["Location"]
    assert location.startswith("/_regcache/redirect?") and signer.target(location).url == "https://cdn.example/blob?sig=1"


def test_a_redirect_to_this_machine_loses_its_location():
    _, _, flow = upstream_flow(307, {"Location": "https://127.0.0.1:5070/metrics"})
    assert "Location" not in flow.response.headers


def test_redacted_also_when_the_upstream_connection_fails():
    addon = credentials(RedirectSigner())
    addon.auth = FixedAuth()
    flow = tflow.tflow()
    flow.metadata[UPSTREAM] = Target(HUB, "manifest", "library/small", "1.0", "/v2/library/small/manifests/1.0")
    asyncio.run(addon.request(flow))
    addon.error(flow)
    assert flow.request.headers["Authorization"] == REDACTED


def test_upstream_rate_limit_headers_reach_the_metrics():
    addon, _, _ = upstream_flow(200, {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "42;w=21600"})
    assert addon.metrics.registry.get_sample_value(
        "regcache_upstream_ratelimit_remaining", {"registry": "docker.io"}) == 42
