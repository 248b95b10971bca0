"""The addon on mitmproxy's test flows where a name must resolve: the e2e lane's /etc/hosts points
the test names at 127.0.0.1. The rest of the addon is in tests/unit/test_addon.py."""

from __future__ import annotations

from mitmproxy import connection
from mitmproxy.proxy import server_hooks

from regcache_core.config import DEFAULTS, parse_config
from regcache_core.mitm.router import Router
from regcache_core.mitm.settings import Settings
from regcache_core.routing import Target
from regcache_core.upstream.redirects import RedirectSigner
from tests.unit.test_addon import DIGEST, client_flow, route


def test_a_followed_redirect_connects_to_the_address_that_was_checked():
    """The target's name is resolved once, when it is checked; the connection goes to that
    address (mitmproxy does not look the name up again), Host and SNI keep the name."""
    config = parse_config({**DEFAULTS, "REGISTRY_DOMAIN": "regcache.test", "GHCR_CACHE": "none",
                           "GHCR_UPSTREAM": "http://127.0.0.1:6000"})  # on loopback: may redirect there
    blob = Target(config.registry("ghcr.io"), "blob", "x", DIGEST, f"/v2/x/blobs/{DIGEST}")
    signer = RedirectSigner()
    target = "http://docker.io.regcache.test:6002/blob"  # conftest's /etc/hosts: 127.0.0.1
    flow = client_flow(signer.location("http://127.0.0.1:6000/v2/x/blobs/" + DIGEST, target, blob))
    router = Router(Settings(), signer)
    router.settings.config = config
    route(router, flow)
    assert flow.response is None and flow.request.headers["Host"] == "docker.io.regcache.test:6002"
    server = connection.Server(address=(flow.request.host, flow.request.port))
    router.server_connect(server_hooks.ServerConnectionHookData(server=server, client=flow.client_conn))
    assert server.address == ("127.0.0.1", 6002)
    other = connection.Server(address=("cdn.example", 443))  # not a checked redirect target: left alone
    router.server_connect(server_hooks.ServerConnectionHookData(server=other, client=flow.client_conn))
    assert other.address == ("cdn.example", 443)
    router.client_disconnected(flow.client_conn)
    assert router._checked == {}
