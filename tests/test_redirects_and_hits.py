"""Signed redirect paths and the hit/miss table, without mitmproxy."""

from __future__ import annotations

from regcache_core.cache_watch import InFlight
from regcache_core.redirects import RedirectSigner, is_redirect_path

BLOB = "https://registry-1.docker.io/v2/library/small/blobs/sha256:" + "a" * 64
CDN = "https://cdn.example/blobs/x?sig=abc&expires=1"
TAG_DIGEST = "sha256:" + "b" * 64


def test_only_redirects_we_signed_are_followed():
    signer = RedirectSigner()
    path = signer.location(BLOB, CDN)
    assert is_redirect_path(path) and signer.target(path) == CDN
    assert signer.target(path.replace("cdn.example", "evil.example")) is None
    assert RedirectSigner().target(path) is None  # another process's key
    assert signer.target("/_regcache/redirect?url=https://evil.example/") is None


def test_relative_locations_resolve_against_the_upstream_and_odd_schemes_are_dropped():
    signer = RedirectSigner()
    assert signer.target(signer.location(BLOB, "/elsewhere?a=1")) == "https://registry-1.docker.io/elsewhere?a=1"
    assert signer.location(BLOB, "file:///etc/passwd") is None


def test_upstream_fetch_during_a_client_request_makes_it_a_miss():
    table = InFlight()
    table.started("client-1", "docker.io", "library/small", TAG_DIGEST)
    table.started("client-2", "docker.io", "library/other", TAG_DIGEST)
    table.upstream_request("docker.io", "library/small", TAG_DIGEST, "GET")
    assert (table.finished("client-1"), table.finished("client-2")) == ("miss", "hit")
    assert len(table) == 0 and table.finished("client-1") is None


def test_tag_freshness_check_is_a_hit_but_a_fetch_by_the_resolved_digest_is_a_miss():
    table = InFlight()
    table.started("warm", "docker.io", "library/small", "1.0")
    table.upstream_request("docker.io", "library/small", "1.0", "HEAD")
    table.tag_resolved("docker.io", "library/small", "1.0", TAG_DIGEST)
    assert table.finished("warm") == "hit"
    table.started("cold", "docker.io", "library/small", "1.0")
    table.upstream_request("docker.io", "library/small", "1.0", "HEAD")
    table.tag_resolved("docker.io", "library/small", "1.0", TAG_DIGEST)
    table.upstream_request("docker.io", "library/small", TAG_DIGEST, "GET")
    assert table.finished("cold") == "miss"
    assert len(table) == 0


def test_a_redirect_path_expires_and_its_expiry_is_signed():
    now = [1_000_000.0]
    signer = RedirectSigner(clock=lambda: now[0])
    path = signer.location(BLOB, CDN)
    now[0] += 299
    assert signer.target(path) == CDN
    assert signer.target(path.replace("exp=1000300", "exp=9999999")) is None  # a later expiry is not ours
    now[0] += 2
    assert signer.target(path) is None
