"""Routing as a pure function: which registry, which API call, and what is refused."""

from __future__ import annotations

import json

import pytest

from regcache_core.config import DEFAULTS, parse_config
from regcache_core.routing import Refusal, TagsPage, Target, route

CONFIG = parse_config({**DEFAULTS, "REGISTRY_DOMAIN": "regcache.test", "GHCR_CACHE": "none"})
HUB = "docker.io.regcache.test:5000"
DIGEST = "sha256:" + "ab" * 32
SHA512 = "sha512:" + "cd" * 64


def target(path: str, host: str = HUB, method: str = "GET") -> Target:
    decision = route(CONFIG, method, host, path)
    assert isinstance(decision, Target), decision
    return decision


def refusal(path: str, host: str = HUB, method: str = "GET", proxy_form: bool = False) -> Refusal:
    decision = route(CONFIG, method, host, path, proxy_form=proxy_form)
    assert isinstance(decision, Refusal), decision
    return decision


@pytest.mark.parametrize("host", [
    "docker.io.regcache.test:5000",
    "docker.io.regcache.test",
    "Docker.IO.RegCache.Test:5000",
    "docker.io.regcache.test.:5000",  # a fully qualified name, as some resolvers pass it on
])
def test_virtual_host_names_the_registry(host):
    assert target("/v2/library/small/manifests/1.0", host).registry.name == "docker.io"


def test_virtual_host_wins_over_ns():
    by_host = target("/v2/library/small/manifests/1.0?ns=quay.io")
    assert (by_host.registry.name, by_host.by_ns) == ("docker.io", False)
    unmapped = refusal("/v2/library/small/manifests/1.0?ns=docker.io", host="unmapped.io.regcache.test")
    assert (unmapped.status, unmapped.code) == (404, "NAME_UNKNOWN")


@pytest.mark.parametrize("host", ["127.0.0.1:5000", "mirror.example.com", "[::1]:5000", "::1", ""])
def test_ns_names_the_registry_on_any_host(host):
    decision = target("/v2/library/small/manifests/1.0?ns=Quay.io", host)
    assert decision.registry.name == "quay.io"
    assert decision.path == "/v2/library/small/manifests/1.0"
    assert decision.by_ns  # its answers name the registry (OCI-Namespace)


def test_uncached_registry_goes_to_its_upstream():
    assert target("/v2/", host="ghcr.io.regcache.test:5000").backend == "https://ghcr.io"
    assert target("/v2/").backend == "http://127.0.0.1:5001"


@pytest.mark.parametrize("host, path, named", [
    ("unmapped.io.regcache.test:5000", "/v2/x/manifests/1", "unmapped.io"),
    ("127.0.0.1:5000", "/v2/x/manifests/1?ns=unmapped.io", "unmapped.io"),
    ("127.0.0.1:5000", "/v2/x/manifests/1", "127.0.0.1:5000"),
    ("[::1]:5000", "/v2/", "[::1]:5000"),
    ("regcache.test:5000", "/v2/", "regcache.test:5000"),  # the domain itself names no registry
    (f"{HUB}, ghcr.io.regcache.test", "/v2/", f"{HUB}, ghcr.io.regcache.test"),  # two Host headers, joined
    ("docker.io.regcache.test:http", "/v2/", "docker.io.regcache.test:http"),
])
def test_no_registry_is_404_name_unknown_naming_the_host(host, path, named):
    decision = refusal(path, host)
    assert (decision.status, decision.code) == (404, "NAME_UNKNOWN")
    error = json.loads(decision.body())["errors"][0]
    assert error["code"] == "NAME_UNKNOWN" and named in error["message"]


@pytest.mark.parametrize("path", ["/v2", "/v2/", "/v2/?ns=docker.io"])
def test_ping(path):
    decision = target(path, host="127.0.0.1:5000" if "ns=" in path else HUB)
    assert (decision.kind, decision.repository, decision.reference) == ("ping", None, None)
    assert decision.path == path.partition("?")[0]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("reference", ["1.0", "latest", "v1.2.3-rc_1", "_underscore", "A" * 128, DIGEST, SHA512])
def test_manifest_by_tag_or_digest(method, reference):
    decision = target(f"/v2/library/small/manifests/{reference}", method=method)
    assert (decision.kind, decision.repository, decision.reference) == ("manifest", "library/small", reference)


@pytest.mark.parametrize("reference", [DIGEST, SHA512])
def test_blob_by_digest(reference):
    decision = target(f"/v2/library/small/blobs/{reference}?ns=docker.io", host="127.0.0.1:5000")
    assert (decision.kind, decision.reference) == ("blob", reference)
    assert decision.path == f"/v2/library/small/blobs/{reference}"


def test_tags_list_keeps_its_query_but_not_ns_for_an_upstream_which_pages_itself():
    decision = target("/v2/library/small/tags/list?n=10&ns=ghcr.io&last=1.0", host="127.0.0.1:5000")
    assert (decision.kind, decision.repository, decision.reference) == ("tags", "library/small", None)
    assert decision.path == "/v2/library/small/tags/list?n=10&last=1.0" and decision.page is None


def test_a_caches_tags_list_is_asked_whole_and_paged_by_regcache():
    decision = target("/v2/library/small/tags/list?n=10&ns=docker.io&last=1.0", host="127.0.0.1:5000")
    assert decision.path == "/v2/library/small/tags/list"
    assert decision.page == TagsPage(10, "1.0", "/v2/library/small/tags/list?ns=docker.io")
    assert target("/v2/library/small/tags/list").page == TagsPage(None, None, "/v2/library/small/tags/list")


@pytest.mark.parametrize("repository", [
    "alpine", "library/alpine", "a/b/c/d", "my-org/my_app.v2", "x__y/a--b", "manifests/blobs", "0/1",
])
def test_nested_and_unusual_but_valid_repositories(repository):
    assert target(f"/v2/{repository}/manifests/1.0").repository == repository


@pytest.mark.parametrize("repository", [
    "Library/small",  # uppercase
    "library/../etc",
    "library/./small",
    "library%2Fsmall",  # percent-encoded: never decoded into a path
    "library/sm%61ll",
    "library//small",
    "-leading/dash",
    "trailing./dot",
    "a" * 256,
])
def test_bad_repository_names_are_400_name_invalid(repository):
    decision = refusal(f"/v2/{repository}/manifests/1.0")
    assert (decision.status, decision.code) == (400, "NAME_INVALID")


def test_a_name_of_255_characters_is_valid_and_a_longer_one_is_echoed_cut_short():
    assert target(f"/v2/{'a' * 255}/manifests/1.0").repository == "a" * 255
    assert len(refusal(f"/v2/{'a' * 100_000}/manifests/1.0").message) < 200


def test_error_messages_echo_client_values_cut_short():
    assert len(refusal("/" + "x" * 100_000).message) < 200


@pytest.mark.parametrize("kind, reference", [
    ("blobs", "latest"),  # blobs only by digest
    ("blobs", "sha256:bad"),
    ("blobs", "sha256:" + "AB" * 32),  # hex is lowercase
    ("blobs", "sha256:" + "ab" * 31),
    ("blobs", "md5:" + "ab" * 16),
    ("manifests", "sha256:" + "ab" * 33),
    ("manifests", "sha256:%2e%2e"),
])
def test_bad_digests_are_400_digest_invalid(kind, reference):
    decision = refusal(f"/v2/library/small/{kind}/{reference}")
    assert (decision.status, decision.code) == (400, "DIGEST_INVALID")


@pytest.mark.parametrize("reference", [".INVALID_NAME", "..", ".hidden", "-dash", "A" * 129, "1%2E0", "tag;rm", "t@g"])
def test_impossible_tags_are_404_manifest_unknown(reference):
    decision = refusal(f"/v2/library/small/manifests/{reference}")
    assert (decision.status, decision.code) == (404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("path", [
    "/v2/_catalog",
    "/v2/library/small/blobs/uploads/",
    "/v2/library/small/blobs/uploads/1234",
    "/v2/library/small/tags/other",
    "/v2/library/small/tags/list/",
])
def test_other_registry_api_paths_are_404(path):
    decision = refusal(path)
    assert (decision.status, decision.code) == (404, "UNSUPPORTED")


@pytest.mark.parametrize("path", ["/", "/admin", "/v1/_ping", "/v2x", "/V2/", "/../v2/", "*"])
def test_paths_outside_v2_are_404(path):
    decision = refusal(path)
    assert decision.status == 404 and path in decision.message


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE", "OPTIONS", "TRACE", "get"])
def test_methods_other_than_get_and_head_are_405_unsupported(method):
    decision = refusal("/v2/library/small/blobs/uploads/", method=method)
    assert (decision.status, decision.code) == (405, "UNSUPPORTED")
    assert method in decision.message


@pytest.mark.parametrize("method, proxy_form", [("CONNECT", True), ("CONNECT", False), ("GET", True)])
def test_forward_proxy_requests_are_refused(method, proxy_form):
    """CONNECT and absolute-form requests: regcache is never an open proxy, whatever the path."""
    decision = refusal("/v2/", method=method, proxy_form=proxy_form)
    assert (decision.status, decision.code) == (400, "UNSUPPORTED")


def test_refusal_body_is_registry_error_json():
    assert json.loads(Refusal(404, "NAME_UNKNOWN", 'no "registry"').body()) == {
        "errors": [{"code": "NAME_UNKNOWN", "message": 'no "registry"'}]
    }


def test_referrers_go_to_the_upstream_even_of_a_cached_registry():
    decision = target(f"/v2/library/small/referrers/{DIGEST}?artifactType=application%2Fvnd.example")
    assert (decision.kind, decision.reference, decision.goes_upstream) == ("referrers", DIGEST, True)
    assert decision.backend == CONFIG.registry("docker.io").upstream
    assert decision.path == f"/v2/library/small/referrers/{DIGEST}?artifactType=application%2Fvnd.example"
    assert (refusal("/v2/library/small/referrers/latest").code) == "DIGEST_INVALID"
