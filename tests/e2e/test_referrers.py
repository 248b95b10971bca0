"""Referrers (OCI 1.1, `GET /v2/<name>/referrers/<digest>`, how cosign and notation find
signatures): registry:2 2.8 has no such API, so regcache asks the upstream itself, with its
credentials, and passes the answer on; an upstream without the API answers 404."""

from __future__ import annotations

import json

import pytest

from tests.support.fakes import ReferrersRegistry, TokenServer
from tests.support.parts import OCI_INDEX, PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, docker_io_stack, http_get

PORT = PORT_BASES["test_referrers"]
HUB = f"docker.io.{TEST_DOMAIN}:{PORT}"
SUBJECT = "sha256:" + "5a" * 32
SIGNATURE = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "51" * 32, "size": 700,
             "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json"}
SBOM = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "5b" * 32, "size": 800,
        "artifactType": "application/spdx+json", "annotations": {"org.example.sbom.format": "json"}}


@pytest.fixture(scope="module")
def referrers_upstream(tmp_path_factory):
    tokens = TokenServer(tmp_path_factory.mktemp("tokens"), PORT + UPSTREAM_OFFSET + 1, {"puller": "pull-secret"}).start()
    upstream = ReferrersRegistry(PORT + UPSTREAM_OFFSET, tokens).start()
    upstream.referrers[("library/signed", SUBJECT)] = [SIGNATURE, SBOM]
    stack = docker_io_stack(tmp_path_factory.mktemp("referrers"), upstream, PORT, {
        "DOCKERHUB_USERNAME": "puller", "DOCKERHUB_PASSWORD": "pull-secret"}).start()
    yield stack, upstream, tokens
    stack.stop()
    upstream.stop()
    tokens.stop()


def referrers(path: str) -> tuple[int, dict, bytes]:
    return http_get(f"http://127.0.0.1:{PORT}{path}", host=HUB, headers={"Authorization": "Bearer client-secret"})


def test_referrers_come_from_the_upstream_with_regcaches_credentials(referrers_upstream):
    _, upstream, tokens = referrers_upstream
    status, headers, body = referrers(f"/v2/library/signed/referrers/{SUBJECT}")
    assert (status, headers["Content-Type"]) == (200, OCI_INDEX)
    assert json.loads(body)["manifests"] == [SIGNATURE, SBOM]
    assert "WWW-Authenticate" not in headers
    asked = [(path, authorization) for path, authorization in upstream.requests if "/referrers/" in path]
    assert asked and all(a.removeprefix("Bearer ") in tokens.issued for _, a in asked)  # ours, never the client's
    assert tokens.granted_requests_for("repository:library/signed:pull") == 1


def test_referrers_filtered_by_artifact_type_and_none_for_an_unsigned_image(referrers_upstream):
    status, headers, body = referrers(f"/v2/library/signed/referrers/{SUBJECT}?artifactType=application%2Fspdx%2Bjson")
    assert (status, headers["OCI-Filters-Applied"], json.loads(body)["manifests"]) == (200, "artifactType", [SBOM])
    status, _, body = referrers(f"/v2/library/unsigned/referrers/{SUBJECT}")
    assert (status, json.loads(body)["manifests"]) == (200, [])


def test_referrers_of_an_upstream_without_the_api_are_404(stack, upstream, images):
    """The session upstream is registry:2 2.8, as Docker Hub's own software has no referrers API either."""
    digest = images["small"].manifest_digest
    status, _, _ = http_get(f"http://127.0.0.1:{stack.port}/v2/library/small/referrers/{digest}",
                            host=f"docker.io.{TEST_DOMAIN}:{stack.port}")
    assert status == 404
    assert [line.status for line in upstream.requests_for(f"/referrers/{digest}", "GET")] == [404]  # asked, not the cache
