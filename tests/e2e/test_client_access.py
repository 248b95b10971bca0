"""Who may use regcache, end to end: REGCACHE_CLIENTS, REGCACHE_HTPASSWD and K_REPOSITORIES.

One stack: docker.io cached from the session upstream (only library/small served), ghcr.io
passed through to a recording server, so that what a client's request carries upstream shows.
Only 127.0.0.1 may use it, with an account of its htpasswd file.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess

import pytest

from tests.support.clients import Containerd
from tests.support.fakes import Cdn
from tests.support.parts import (
    MANIFEST_TYPES, PORT_BASES, REGCACHE, TEST_DOMAIN, UPSTREAM_OFFSET, docker_io_stack, http_get, poll, pull,
    raw_exchange, skopeo,
)

PORT = PORT_BASES["test_client_access"]
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"
USER = "puller"
PASSWORD = "pw-" + secrets.token_urlsafe(12)


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    """ghcr.io's upstream: answers 404 to everything, and records each request's Authorization."""
    server = Cdn(tmp_path_factory.mktemp("recorder"), PORT + UPSTREAM_OFFSET).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, upstream, recorder):
    tmp = tmp_path_factory.mktemp("access")
    line = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True).stdout
    (tmp / "htpasswd").write_text(line.strip() + "\n")
    stack = docker_io_stack(tmp / "stack", upstream, PORT, {
        "REGCACHE_REGISTRIES": "DOCKERHUB,GHCR",
        "REGCACHE_CLIENTS": "127.0.0.1/32, ::1",
        "REGCACHE_HTPASSWD": str(tmp / "htpasswd"),
        "DOCKERHUB_REPOSITORIES": "library/small, team/*",
        "GHCR_UPSTREAM": recorder.url,
        "GHCR_CACHE": "none",
    }).start()
    yield stack
    stack.stop()


def cache_log(stack) -> str:
    return (stack.data_dir / "dockerhub" / "registry.log").read_text()


def test_an_address_outside_the_clients_is_refused_and_reaches_nothing(guarded, upstream, images):
    path = f"/v2/{images['small'].name}/manifests/{images['small'].tag}"
    upstream_before = len(upstream.access_log())
    answer = raw_exchange(PORT, f"GET {path} HTTP/1.1\r\nHost: {DOCKER_IO}\r\nConnection: close\r\n\r\n".encode(),
                          source="127.0.0.2")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403")
    assert json.loads(body)["errors"][0] == {
        "code": "DENIED", "message": "127.0.0.2 is not in the networks allowed to use this regcache"}
    assert path not in cache_log(guarded)
    assert len(upstream.access_log()) == upstream_before


def test_refused_requests_are_each_counted_and_logged_once_a_minute_per_address(guarded, images):
    path = f"/v2/{images['small'].name}/manifests/{images['small'].tag}"
    request = f"GET {path} HTTP/1.1\r\nHost: {DOCKER_IO}\r\nConnection: close\r\n\r\n".encode()
    refused = ("regcache_client_refusals_total", (("reason", "network"),))
    before = guarded.metrics().get(refused, 0)
    for _ in range(100):
        assert raw_exchange(PORT, request, source="127.0.0.3").startswith(b"HTTP/1.1 403")
    assert guarded.metrics()[refused] - before == 100
    lines = poll(lambda: [line for line in guarded.output if "refused client 127.0.0.3:" in line], bool)
    assert len(lines) == 1 and "not in REGCACHE_CLIENTS" in lines[0], lines


def test_the_data_plane_refuses_an_address_outside_the_clients(guarded):
    """Even with a data-plane URL in hand (here any: the address is checked first)."""
    request = f"GET /_regcache/blob?digest=x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    outside = raw_exchange(PORT + 50, request, source="127.0.0.2").partition(b"\r\n\r\n")
    inside = raw_exchange(PORT + 50, request).partition(b"\r\n\r\n")
    assert outside[0].startswith(b"HTTP/1.1 403") and json.loads(outside[2])["errors"][0] == {
        "code": "DENIED", "message": "127.0.0.2 is not in the networks allowed to use this regcache"}
    assert inside[0].startswith(b"HTTP/1.1 403") and b"not a data-plane URL" in inside[2]


def test_without_an_account_the_answer_is_a_basic_challenge(guarded):
    for headers in ({}, basic(USER, "wrong"), {"Authorization": "Bearer " + PASSWORD}, basic("nobody", PASSWORD)):
        status, answer, body = http_get(f"http://{DOCKER_IO}/v2/", headers=headers)
        assert status == 401, headers
        assert answer["WWW-Authenticate"] == 'Basic realm="regcache"'
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"


def test_skopeo_pulls_with_an_account(guarded, images, tmp_path):
    image = images["small"]
    assert pull(DOCKER_IO, image.reference, tmp_path / "pulled", f"--src-creds={USER}:{PASSWORD}") == image.manifest_digest
    refused = skopeo("copy", "--src-tls-verify=false", f"--src-creds={USER}:wrong",
                     f"docker://{DOCKER_IO}/{image.reference}", f"oci:{tmp_path / 'refused'}")
    assert refused.returncode != 0 and ("401" in refused.stderr or "unauthorized" in refused.stderr.lower())


@pytest.fixture(scope="module")
def client_files(guarded, tmp_path_factory):
    out = tmp_path_factory.mktemp("client-files")
    result = subprocess.run([*REGCACHE, "client-config", "--out", str(out), "--endpoint", f"http://127.0.0.1:{PORT}",
                             "--username", USER, "--password-stdin"], input=PASSWORD + "\n", cwd=guarded.workdir,
                            env={**os.environ, **guarded.settings}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return out


def test_client_files_with_credentials_are_private(client_files):
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for path, secret in (("auth.json", encoded), ("registries.yaml", PASSWORD), ("certs.d/docker.io/hosts.toml", encoded)):
        assert secret in (client_files / path).read_text(), path
        assert (client_files / path).stat().st_mode & 0o077 == 0, path


def test_containerd_pulls_with_the_generated_header(guarded, client_files, images, tmp_path):
    image = images["small"]
    before = len(guarded.pull_records())
    containerd = Containerd(tmp_path / "containerd").start()
    try:
        result = containerd.pull(f"docker.io/{image.reference}", client_files / "certs.d")
        assert result.returncode == 0, result.stderr
        assert containerd.image_digest(f"docker.io/{image.reference}") == image.manifest_digest
    finally:
        containerd.stop()
    # Through regcache, not by falling back to the upstream (`server`) after a 401.
    records = guarded.records_of_pull(image, before)
    assert {r["status"] for r in records if r["kind"] == "blob"} == {200}


def test_skopeo_pulls_with_the_generated_auth_file(client_files, images, tmp_path):
    image = images["small"]
    assert pull(DOCKER_IO, image.reference, tmp_path / "pulled", f"--src-authfile={client_files / 'auth.json'}") \
        == image.manifest_digest


def test_the_clients_credentials_are_never_forwarded(guarded, recorder):
    status, _, _ = http_get(f"http://ghcr.io.{TEST_DOMAIN}:{PORT}/v2/library/small/manifests/1.0",
                            headers={**basic(USER, PASSWORD), "Accept": MANIFEST_TYPES})
    assert status == 404  # the recorder has no manifests; what matters is what it received
    assert recorder.requests and all(authorization is None for *_, authorization in recorder.requests)


def test_a_repository_outside_the_patterns_is_unknown_without_a_backend_request(guarded, upstream, images):
    image = images["big"]
    path = f"/v2/{image.name}/manifests/{image.tag}"
    upstream_before = upstream.requests_for(path)
    status, _, body = http_get(f"http://{DOCKER_IO}{path}", headers={**basic(USER, PASSWORD), "Accept": MANIFEST_TYPES})
    assert status == 404
    assert json.loads(body)["errors"][0] == {
        "code": "NAME_UNKNOWN", "message": "repository 'library/big' is not served for docker.io by this regcache"}
    assert path not in cache_log(guarded)
    assert upstream.requests_for(path) == upstream_before
