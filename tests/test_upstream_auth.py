"""upstream_auth without mitmproxy or a network: challenges, the token dance, the token store."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import time

import pytest

from regcache_core.config import Registry
from regcache_core.upstream.auth import (
    Challenge,
    TokenStore,
    UpstreamAuth,
    UpstreamAuthError,
    cache_lifetime,
    parse_challenge,
    parse_token_response,
    pick_challenge,
    realm_allowed,
)
from regcache_core.upstream.client import NoAnswer, UpstreamClient

from fakes import Challenger, Redirector, TokenServer
from parts import PORT_BASES

PORT = PORT_BASES["test_upstream_auth"]

HUB = Registry("DOCKERHUB", "docker.io", "https://registry-1.docker.io", "http://127.0.0.1:5001", "me", "secret-pw")
ANONYMOUS = Registry("GHCR", "ghcr.io", "https://ghcr.io", None)
BEARER = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io"'


@pytest.mark.parametrize("value, expected", [
    (BEARER, Challenge("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io"})),
    ('bearer  realm="https://quay.io/v2/auth" , service=quay.io', Challenge("bearer", {"realm": "https://quay.io/v2/auth", "service": "quay.io"})),
    ('Bearer realm="https://x/token",scope="repository:a/b:pull,push",error="insufficient_scope"',
     Challenge("bearer", {"realm": "https://x/token", "scope": "repository:a/b:pull,push", "error": "insufficient_scope"})),
    ('Basic realm="say \\"hi\\""', Challenge("basic", {"realm": 'say "hi"'})),
    ("Basic", Challenge("basic", {})),
    ('Bearer service="x"', None),  # no realm: nowhere to get a token
    ('Bearer realm="file:///etc/passwd"', None),
    ('Negotiate abc', None),
    ("", None),
])
def test_parse_challenge(value, expected):
    assert parse_challenge(value) == expected


def test_bearer_is_preferred_over_basic():
    assert pick_challenge(['Basic realm="x"', BEARER]).scheme == "bearer"
    assert pick_challenge(["Negotiate"]) is None


@pytest.mark.parametrize("body, expected", [
    (b'{"token":"t","expires_in":300}', ("t", 300)),
    (b'{"access_token":"a"}', ("a", 60)),
    (b'{"token":"t","access_token":"a","expires_in":"soon"}', ("t", 60)),
])
def test_parse_token_response(body, expected):
    assert parse_token_response(body) == expected


@pytest.mark.parametrize("body", [b"{}", b"[]", b"not json", b'{"token":""}'])
def test_token_response_without_a_token_is_refused(body):
    with pytest.raises(ValueError):
        parse_token_response(body)


def test_tokens_are_kept_until_shortly_before_they_expire():
    assert cache_lifetime(60) == 48 and cache_lifetime(300) == 270 and cache_lifetime(1) == 1


class FakeUpstream:
    """Answers like Docker Hub: /v2/ challenges, the realm issues tokens to `password`."""

    def __init__(self, challenge=BEARER, password="secret-pw", delay=0.0):
        self.challenge, self.password, self.delay = challenge, password, delay
        self.calls: list[tuple[str, dict]] = []

    async def __call__(self, url, headers, timeout):
        self.calls.append((url, headers))
        await asyncio.sleep(self.delay)
        if url.endswith("/v2/"):
            return (401, [self.challenge], b"") if self.challenge else (200, [], b"{}")
        expected = "Basic " + base64.b64encode(f"me:{self.password}".encode()).decode()
        if headers.get("Authorization") not in (None, expected):
            return 401, [], b'{"details":"incorrect username or password"}'
        return 200, [], json.dumps({"token": f"token-{len(self.calls)}", "expires_in": 300}).encode()

    def token_requests(self):
        return [url for url, _ in self.calls if not url.endswith("/v2/")]


@pytest.fixture
def store(tmp_path):
    store = TokenStore(tmp_path / "tokens")
    yield store
    store.close()


def test_concurrent_requests_share_one_token_fetch(store):
    upstream = FakeUpstream(delay=0.2)
    auth = UpstreamAuth(store, upstream)

    async def many():
        return await asyncio.gather(*(auth.authorization(HUB, "library/small") for _ in range(10)))

    assert set(asyncio.run(many())) == {"Bearer token-2"}
    assert upstream.token_requests() == [
        "https://auth.docker.io/token?service=registry.docker.io&scope=repository%3Alibrary%2Fsmall%3Apull&account=me"
    ]
    assert upstream.calls[1][1]["Authorization"].startswith("Basic ")


def test_tokens_survive_a_restart_and_a_401_drops_them(tmp_path):
    upstream = FakeUpstream()
    first = TokenStore(tmp_path / "tokens")
    assert asyncio.run(UpstreamAuth(first, upstream).authorization(HUB, "a/b")) == "Bearer token-2"
    first.close()
    again = TokenStore(tmp_path / "tokens")
    auth = UpstreamAuth(again, upstream)
    assert asyncio.run(auth.authorization(HUB, "a/b")) == "Bearer token-2"
    assert len(upstream.token_requests()) == 1
    auth.refused(HUB, "a/b")  # to a stored token: not blamed on the credentials
    assert asyncio.run(auth.authorization(HUB, "a/b")) == "Bearer token-4"  # a new token, the challenge kept
    assert len(upstream.token_requests()) == 2
    again.close()


def test_token_store_is_private_and_expires(store, tmp_path):
    store.put("k", "v", 1)
    assert store.get("k") == "v"
    assert (tmp_path / "tokens").stat().st_mode & 0o777 == 0o700
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "tokens").iterdir()} == {0o600}
    time.sleep(1.1)
    assert store.get("k") is None


def test_anonymous_token_and_scopeless_ping(store):
    upstream = FakeUpstream()
    auth = UpstreamAuth(store, upstream)
    assert asyncio.run(auth.authorization(ANONYMOUS, None)) == "Bearer token-2"
    assert upstream.calls[1] == ("https://auth.docker.io/token?service=registry.docker.io", {})


@pytest.mark.parametrize("challenge, expected", [
    ('Basic realm="r"', "Basic bWU6c2VjcmV0LXB3"),
    (None, None),
])
def test_basic_or_nothing(store, challenge, expected):
    assert asyncio.run(UpstreamAuth(store, FakeUpstream(challenge)).authorization(HUB, "a/b")) == expected


def test_wrong_credentials_give_401_and_one_log_line_without_the_secret(store, caplog):
    auth = UpstreamAuth(store, FakeUpstream(password="other"))
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        with pytest.raises(UpstreamAuthError) as refused:
            asyncio.run(auth.authorization(HUB, "a/b"))
        assert refused.value.status == 401 and "secret-pw" not in str(refused.value)
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "docker.io" in line and "DOCKERHUB_PASSWORD" in line and "secret-pw" not in line


def test_unreachable_upstream_is_a_503_that_says_why(store):
    async def unreachable(url, headers, timeout):
        raise NoAnswer("refused")

    with pytest.raises(UpstreamAuthError) as error:
        asyncio.run(UpstreamAuth(store, unreachable).authorization(HUB, "a/b"))
    assert (error.value.status, error.value.unreachable) == (503, "refused")
    assert "docker.io" in str(error.value) and "(refused)" in str(error.value)


def test_credentials_go_to_an_https_realm_only_unless_the_upstream_is_http(store):
    plain_realm = 'Bearer realm="http://auth.example/token?x=1",service="s"'
    upstream = FakeUpstream(plain_realm)
    with pytest.raises(UpstreamAuthError) as refused:
        asyncio.run(UpstreamAuth(store, upstream).authorization(HUB, "a/b"))
    assert refused.value.status == 502 and "(http://auth.example/token)" in str(refused.value)
    assert upstream.token_requests() == []
    on_http = Registry("LOCAL", "local.test", "http://127.0.0.1:6000", None, "me", "secret-pw", token_realms=("auth.example",))
    assert asyncio.run(UpstreamAuth(store, upstream).authorization(on_http, "a/b")) == "Bearer token-3"


def test_no_lock_is_kept_once_its_fetch_ended(store):
    upstream = FakeUpstream(delay=0.05)
    auth = UpstreamAuth(store, upstream)

    async def many(repositories):
        pulls = [auth.authorization(HUB, repositories[i % len(repositories)]) for i in range(20)]
        await asyncio.gather(*pulls, return_exceptions=True)

    asyncio.run(many([f"repo/n{i}" for i in range(5)]))
    assert len(upstream.token_requests()) == 5  # one per scope: the locks did share fetches
    assert auth._locks == {}
    upstream.password = "changed"  # failing fetches release their locks too
    asyncio.run(many(["repo/refused"]))
    assert auth._locks == {}


def test_a_blackholed_upstream_fails_fast_and_is_not_asked_again_for_a_few_seconds(store):
    """An upstream that accepts connections but never answers (a listening socket nobody reads)."""
    now = [0.0]
    asked = []

    client = UpstreamClient()

    async def fetch(url, headers, timeout):
        asked.append(url)
        return await client.get(url, headers, timeout, 1 << 20)

    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen()
        upstream = Registry("DOCKERHUB", "docker.io", f"http://127.0.0.1:{blackhole.getsockname()[1]}", None)
        auth = UpstreamAuth(store, fetch, challenge_timeout=0.3, clock=lambda: now[0])

        async def pulls(count):
            return await asyncio.gather(*(auth.authorization(upstream, "a/b") for _ in range(count)), return_exceptions=True)

        async def scenario():
            started = time.monotonic()
            errors = await pulls(5)
            assert time.monotonic() - started < 2  # one timeout, not five in turn
            assert {(e.status, e.unreachable) for e in errors} == {(503, "timeout")}
            assert len(asked) == 1
            now[0] += 4
            await pulls(3)
            assert len(asked) == 1  # still remembered
            now[0] += 2
            await pulls(1)
            assert len(asked) == 2  # asked again
            await client.close()

        asyncio.run(scenario())


def refusals_logged(auth: UpstreamAuth, registry: Registry, caplog) -> list[str]:
    """What one authorization, answered 401 by the upstream, logs."""
    caplog.clear()
    asyncio.run(auth.authorization(registry, "a/b"))
    with caplog.at_level(logging.WARNING):
        auth.refused(registry, "a/b")
    return [r.getMessage() for r in caplog.records]


def test_a_401_blames_the_credentials_only_when_it_answers_them(store, caplog):
    anonymous = UpstreamAuth(store, FakeUpstream())
    assert refusals_logged(anonymous, ANONYMOUS, caplog) == []  # a missing or private repository, say
    assert "ghcr.io" in anonymous._challenges  # the challenge is kept
    credentialed = UpstreamAuth(store, FakeUpstream())
    line, = refusals_logged(credentialed, HUB, caplog)  # a token just fetched with the credentials
    assert "DOCKERHUB_PASSWORD" in line and "secret-pw" not in line
    assert "docker.io" not in credentialed._challenges
    credentialed.accepted(HUB, "a/b")
    store.put("docker.io me repository:a/b:pull", "stored", 60)
    assert refusals_logged(credentialed, HUB, caplog) == []  # a stored token: it may have been revoked
    basic = UpstreamAuth(store, FakeUpstream('Basic realm="r"'))
    line, = refusals_logged(basic, HUB, caplog)
    assert "Basic" in line and "DOCKERHUB_PASSWORD" in line


@pytest.mark.parametrize("realm, allowed", [
    ("https://auth.docker.io/token", True),  # the upstream's registrable domain
    ("https://registry-1.docker.io/token", True),
    ("https://docker.io.evil.example/token", False),
    ("https://auth.example.com/token", True),  # listed in DOCKERHUB_TOKEN_REALMS
    ("https://other.example.com/token", False),
])
def test_token_realms_are_on_the_upstreams_domain_or_listed(realm, allowed):
    registry = Registry("DOCKERHUB", "docker.io", "https://registry-1.docker.io", None, token_realms=("auth.example.com",))
    assert realm_allowed(registry, realm) is allowed


def test_an_address_upstream_takes_realms_on_that_address_only():
    registry = Registry("LOCAL", "local.io", "http://127.0.0.1:5001", None)
    assert realm_allowed(registry, "http://127.0.0.1:5002/token") and not realm_allowed(registry, "http://127.0.0.2/token")


def test_a_realm_on_another_domain_gets_no_credentials(store):
    upstream = FakeUpstream('Bearer realm="https://tokens.elsewhere.example/token",service="x"')
    with pytest.raises(UpstreamAuthError, match="DOCKERHUB_TOKEN_REALMS") as refused:
        asyncio.run(UpstreamAuth(store, upstream).authorization(HUB, "a/b"))
    assert refused.value.status == 502 and upstream.token_requests() == []


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
