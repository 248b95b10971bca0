"""upstream_auth against token servers on loopback (127.0.0.1 and 127.0.0.2, fixed ports): real
HTTP redirects. The rest of upstream_auth is in tests/unit/test_upstream_auth.py."""

from __future__ import annotations

import asyncio

import pytest

from regcache_core.config import Registry
from regcache_core.upstream.auth import UpstreamAuth, UpstreamAuthError
from regcache_core.upstream.client import UpstreamClient
from tests.support.fakes import Challenger, Redirector, TokenServer
from tests.support.parts import PORT_BASES
from tests.unit.test_upstream_auth import store  # noqa: F401 (a fixture)

PORT = PORT_BASES["test_upstream_auth"]


def test_a_token_server_redirecting_to_another_host_gets_no_credentials_there(store, tmp_path):
    """Real HTTP on loopback: the realm (127.0.0.1) answers 302 to 127.0.0.2, which records what
    it got; a redirect to the realm's own host is followed with the credentials."""
    tokens = TokenServer(tmp_path / "tokens-root", 7510, {"me": "secret-pw"}).start()
    elsewhere = Redirector(PORT + 1, tokens.url + "/token", host="127.0.0.2").start()
    offsite = Redirector(PORT + 2, f"{elsewhere.url}/token").start()
    onsite = Redirector(PORT + 3, f"{tokens.url}/token").start()
    client = UpstreamClient()

    async def fetch(url, headers, timeout):
        return await client.get(url, headers, timeout, 1 << 20)

    async def authorization(realm_server):
        challenger = Challenger(PORT + 4, f"{realm_server.url}/token").start()
        try:
            registry = Registry("LOCAL", "local.io", challenger.url, None, "me", "secret-pw")
            return await UpstreamAuth(store, fetch).authorization(registry, "a/b")
        finally:
            challenger.stop()

    async def scenario():
        with pytest.raises(UpstreamAuthError, match="redirected to http://127.0.0.2") as refused:
            await authorization(offsite)
        assert refused.value.status == 502
        assert offsite.authorizations[0].startswith("Basic ") and elsewhere.authorizations == []
        assert (await authorization(onsite)).startswith("Bearer ")  # same host: followed, with credentials
        assert [user for user, _ in tokens.requests] == ["me"]  # the credentials arrived
        await client.close()

    try:
        asyncio.run(scenario())
    finally:
        for server in (tokens, elsewhere, offsite, onsite):
            server.stop()
