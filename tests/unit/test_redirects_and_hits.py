"""Signed redirect paths and the hit/miss table, without mitmproxy."""

from __future__ import annotations

import pytest

from regcache_core.observe.hits import InFlight
from regcache_core.config import Registry
from regcache_core.upstream.redirects import RedirectSigner, SignedRedirect, is_redirect_path
from regcache_core.routing import Target

BLOB = "https://registry-1.docker.io/v2/library/small/blobs/sha256:" + "a" * 64
CDN = "https://cdn.example/blobs/x?sig=abc&expires=1"
TAG_DIGEST = "sha256:" + "b" * 64
HUB = Target(Registry("DOCKERHUB", "docker.io", "https://registry-1.docker.io", "http://127.0.0.1:5001"),
             "blob", "library/small", "sha256:" + "a" * 64, "/v2/library/small/blobs/sha256:" + "a" * 64)
ON_LOOPBACK = Target(Registry("LOCAL", "local.test", "http://127.0.0.1:6000", None), "blob", "a/b", TAG_DIGEST, "")


def followed(signer: RedirectSigner, location: str, answers: Target = HUB, request_url: str = BLOB) -> str | None:
    """The URL our redirect path for `location` leads to; None when it was refused."""
    path = signer.location(request_url, location, answers)
    return path and signer.target(path).url


def test_only_redirects_we_signed_are_followed():
    signer = RedirectSigner()
    path = signer.location(BLOB, CDN, HUB)
    assert is_redirect_path(path)
    assert signer.target(path) == SignedRedirect(CDN, "docker.io", "blob", "library/small", "sha256:" + "a" * 64)
    assert signer.target(path.replace("cdn.example", "evil.example")) is None
    assert RedirectSigner().target(path) is None  # another process's key
    assert signer.target("/_regcache/redirect?url=https://evil.example/") is None


def test_relative_locations_resolve_against_the_upstream_and_odd_schemes_are_dropped():
    signer = RedirectSigner()
    assert followed(signer, "/elsewhere?a=1") == "https://registry-1.docker.io/elsewhere?a=1"
    assert followed(signer, "file:///etc/passwd") is None


def test_upstream_fetch_during_a_client_request_makes_it_a_miss():
    table = InFlight()
    table.started("client-1", "docker.io", "library/small", TAG_DIGEST)
    table.started("client-2", "docker.io", "library/other", TAG_DIGEST)
    table.upstream_answer("docker.io", "library/small", TAG_DIGEST, "GET", 200)
    assert (table.finished("client-1", True), table.finished("client-2", True)) == ("miss", "hit")
    assert len(table) == 0 and table.finished("client-1", True) is None


def test_tag_freshness_check_is_a_hit_but_a_fetch_by_the_resolved_digest_is_a_miss():
    table = InFlight()
    table.started("warm", "docker.io", "library/small", "1.0")
    table.upstream_answer("docker.io", "library/small", "1.0", "HEAD", 200)
    table.tag_resolved("docker.io", "library/small", "1.0", TAG_DIGEST)
    assert table.finished("warm", True) == "hit"
    table.started("cold", "docker.io", "library/small", "1.0")
    table.upstream_answer("docker.io", "library/small", "1.0", "HEAD", 200)
    table.tag_resolved("docker.io", "library/small", "1.0", TAG_DIGEST)
    table.upstream_answer("docker.io", "library/small", TAG_DIGEST, "GET", 200)
    assert table.finished("cold", True) == "miss"
    assert len(table) == 0


@pytest.mark.parametrize("status, served, result", [
    (404, True, "hit"),  # the upstream brought nothing: no miss
    (304, True, "hit"),
    (None, True, "stale"),  # no answer, the cache served its own copy
    (503, True, "stale"),
    (429, True, "stale"),
    (None, False, None),  # nothing served: no hit, not stale either
    (404, False, None),  # the cache answered 404 too: nothing from the cache
    (200, False, None),  # fetched, but the client got an error: no content served, no mark
])
def test_an_upstream_answer_without_content_is_no_miss_and_a_failed_one_makes_a_served_copy_stale(status, served, result):
    table = InFlight()
    table.started("client", "docker.io", "library/small", TAG_DIGEST)
    table.upstream_answer("docker.io", "library/small", TAG_DIGEST, "GET", status)
    assert table.finished("client", served) == result


def test_a_redirect_path_expires_and_its_expiry_is_signed():
    now = [1_000_000.0]
    signer = RedirectSigner(clock=lambda: now[0])
    path = signer.location(BLOB, CDN, HUB)
    now[0] += 299
    assert signer.target(path).url == CDN
    assert signer.target(path.replace("exp=1000300", "exp=9999999")) is None  # a later expiry is not ours
    now[0] += 2
    assert signer.target(path) is None


@pytest.mark.parametrize("location", [
    "http://cdn.example/blob",  # an https upstream's redirect must stay on https
    "https://127.0.0.1:5070/metrics", "https://[::1]/x", "https://localhost/x", "https://LOCALHOST./x",
    "https://blobs.localhost/x", "https://169.254.169.254/latest/meta-data/", "https://[fe80::1]/x",
    "https://0.0.0.0/x", "https://[::ffff:127.0.0.1]/x",
])
def test_an_upstream_cannot_redirect_to_this_machine_or_down_to_http(location):
    assert followed(RedirectSigner(), location) is None


def test_private_addresses_and_a_loopback_upstreams_own_loopback_are_allowed():
    signer = RedirectSigner()
    assert followed(signer, "https://10.1.2.3/blob") == "https://10.1.2.3/blob"
    local_blob = "http://127.0.0.1:6000/v2/x/blobs/" + TAG_DIGEST
    assert followed(signer, "http://127.0.0.1:6002/blob", ON_LOOPBACK, local_blob) == "http://127.0.0.1:6002/blob"


def test_one_upstream_blob_fetch_makes_one_miss_and_the_clients_it_served_meanwhile_hits():
    table = InFlight()
    for client in ("first", "second", "third"):
        table.started(client, "docker.io", "library/big", TAG_DIGEST)
    table.upstream_answer("docker.io", "library/big", TAG_DIGEST, "GET", 200, blob=True)
    assert [table.finished(c, True) for c in ("first", "second", "third")] == ["miss", "hit", "hit"]
    assert len(table) == 0
