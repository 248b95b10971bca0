"""Outages: the upstream stopped (connections refused) or blackholed (SIGSTOP: it accepts
connections and answers nothing). Cached tags and digests are still served, marked `stale`;
a reference never seen gets 503 UNAVAILABLE saying why, within the bound; one warning line per
change; a restart of regcache during the outage still serves cached tags; containerd pulls
what is cached and falls back to its server for what is not.

A stack and an upstream of the module's own, with a short TTL and upstream bound; the
containerd fallback server is a second registry holding the image regcache never saw.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time

import pytest

from tests.support.clients import Containerd
from tests.support.parts import (
    MANIFEST_TYPES, PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, Stack, Upstream, build_image, docker_io_stack,
    http_get, poll, raw_exchange, raw_request, split_responses,
)
from regcache_core.commands.client_config import hosts_toml

PORT = PORT_BASES["test_outages"]
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"
GHCR = f"ghcr.io.{TEST_DOMAIN}:{PORT}"
TTL, BOUND = 1.0, 1.5
SLACK = 1.5  # seconds: process start-up and scheduling on a busy 2-core machine


@pytest.fixture(scope="module")
def cached(tmp_path_factory, module_upstream):
    """An image pulled once through the stack, and one the stack never saw."""
    workdir = tmp_path_factory.mktemp("outage-images")
    seen = build_image(workdir, "library/seen", [("etc/seen", os.urandom(2000))])
    unseen = build_image(workdir, "library/unseen", [("etc/unseen", os.urandom(2000))])
    module_upstream.push(seen)
    module_upstream.push(unseen)
    return seen, unseen


@pytest.fixture(scope="module")
def outage_stack(tmp_path_factory, module_upstream, cached) -> Stack:
    stack = docker_io_stack(tmp_path_factory.mktemp("outage-stack"), module_upstream, PORT, {
        "REGCACHE_TAG_TTL": str(TTL), "REGCACHE_UPSTREAM_TIMEOUT": str(BOUND),
        "REGCACHE_REGISTRIES": "DOCKERHUB,GHCR,QUAY", "GHCR_UPSTREAM": module_upstream.url, "GHCR_CACHE": "none",
        # A name no resolver knows (the tests' network has no DNS server).
        "QUAY_UPSTREAM": f"http://nowhere.{TEST_DOMAIN}:{PORT + 2}", "QUAY_CACHE": "none"}).start()
    seen, _ = cached
    assert manifest(seen.name, seen.tag, host=GHCR)[0] == 200  # ghcr.io passes through, uncached
    for digest in seen.blob_digests:  # the whole image in the cache, as a pull leaves it
        assert http_get(f"http://127.0.0.1:{PORT}/v2/{seen.name}/blobs/{digest}", host=DOCKER_IO)[0] == 200
    assert manifest(seen.name, seen.tag)[0] == 200
    yield stack
    assert stack.stop() == 0


@pytest.fixture
def upstream_down(outage_stack, module_upstream):
    """The upstream stopped for one test, started again after it (and seen to be back)."""
    module_upstream.stop()
    time.sleep(TTL)  # every tag the stack learnt is stale now
    yield
    module_upstream.start()
    wait_until_back(outage_stack)


@contextlib.contextmanager
def blackholed(stack: Stack, upstream: Upstream):
    """The upstream stopped by SIGSTOP: the kernel still accepts its connections, nothing answers."""
    os.kill(upstream.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(upstream.process.pid, signal.SIGCONT)
    wait_until_back(stack)


def wait_until_back(stack: Stack) -> None:
    """Until the background probe has seen the module's upstream answer (docker.io and ghcr.io)."""
    upstreams = poll(lambda: json.loads(stack.admin("/ready")[2])["upstreams"],
                     lambda states: states["docker.io"] == states["ghcr.io"] == "up", timeout=15)
    assert upstreams["docker.io"] == upstreams["ghcr.io"] == "up", upstreams


def manifest(name: str, reference: str, method: str = "GET", host: str = DOCKER_IO) -> tuple[int, dict, bytes]:
    return http_get(f"http://127.0.0.1:{PORT}/v2/{name}/manifests/{reference}", host=host, method=method,
                    headers={"Accept": MANIFEST_TYPES})


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def warnings(stack: Stack, words: str) -> list[str]:
    return [line for line in stack.output if words in line]


def check_outage_answers(stack: Stack, seen, unseen, reason: str) -> None:
    (status, headers, body), took = timed(lambda: manifest(seen.name, seen.tag))
    assert (status, headers["Docker-Content-Digest"]) == (200, seen.manifest_digest)
    assert took < BOUND + SLACK
    for _ in range(5):  # while it stays down, nobody waits for it
        (status, _, body), took = timed(lambda: manifest(seen.name, seen.tag))
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == seen.manifest_digest
        assert took < SLACK
    assert manifest(seen.name, seen.manifest_digest)[0] == 200
    assert manifest(seen.name, seen.tag, "HEAD")[0] == 200
    for digest in seen.blob_digests:
        assert http_get(f"http://127.0.0.1:{PORT}/v2/{seen.name}/blobs/{digest}", host=DOCKER_IO)[0] == 200
    (status, _, body), took = timed(lambda: manifest(unseen.name, unseen.tag))
    assert status == 503 and took < BOUND + SLACK
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNAVAILABLE" and "docker.io" in error["message"] and f"({reason})" in error["message"]
    check_unseen_blob(unseen, reason)
    unseen_refs = {(unseen.name, unseen.tag), (unseen.name, unseen.blob_digests[-1])}
    records = stack.pull_records_until(lambda rs: len([r for r in rs if (r["repository"], r["reference"]) in unseen_refs]) >= 3)
    tag_records = [r for r in records if (r["repository"], r["reference"]) == (seen.name, seen.tag)]
    assert tag_records[-1]["cache"] == "stale"
    failed = [r for r in records if (r["repository"], r["reference"]) in unseen_refs]
    assert failed and {(r["status"], r["cache"]) for r in failed} == {(503, None)}  # served nothing: no hit
    status, _, body = stack.admin("/ready")
    assert status == 200 and json.loads(body)["upstreams"]["docker.io"] == f"down: {reason}"


def check_unseen_blob(unseen, reason: str) -> None:
    """A blob the cache lacks, GET and HEAD on one connection: regcache's 503 JSON naming the
    registry, framed by its own length (not registry:2's 500, at times with the blob's length)."""
    path = f"/v2/{unseen.name}/blobs/{unseen.blob_digests[-1]}"
    reply, took = timed(lambda: raw_exchange(PORT, raw_request(f"HEAD {path} HTTP/1.1", host=DOCKER_IO, close=False)
                                             + raw_request(f"GET {path} HTTP/1.1", host=DOCKER_IO)))
    (head_status, head_headers, _), (status, headers, body) = split_responses(reply, ["HEAD", "GET"])
    assert head_status == status == 503 and took < BOUND + SLACK, reply[:300]
    assert head_headers["content-length"] == headers["content-length"] == str(len(body))
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNAVAILABLE" and "docker.io" in error["message"] and f"({reason})" in error["message"]


def test_upstream_stopped_cached_content_served_unseen_503_and_one_warning(outage_stack, cached, upstream_down):
    seen, unseen = cached
    check_outage_answers(outage_stack, seen, unseen, "refused")
    assert len(warnings(outage_stack, "is unreachable (refused)")) == 1
    metrics = outage_stack.metrics()
    assert metrics[("regcache_upstream_up", (("registry", "docker.io"),))] == 0
    assert sum(v for (name, labels), v in metrics.items()
               if name == "regcache_requests_total" and ("cache", "stale") in labels) >= 1


def test_a_restart_during_the_outage_still_serves_cached_tags(outage_stack, cached, upstream_down):
    seen, _ = cached
    outage_stack.stop()
    outage_stack.start()
    status, headers, _ = manifest(seen.name, seen.tag)
    assert (status, headers["Docker-Content-Digest"]) == (200, seen.manifest_digest)


def test_upstream_blackholed_costs_the_bound_once(outage_stack, module_upstream, cached):
    seen, unseen = cached
    with blackholed(outage_stack, module_upstream):
        time.sleep(TTL)  # every tag the stack learnt is stale now
        check_outage_answers(outage_stack, seen, unseen, "timeout")
    assert len(warnings(outage_stack, "of docker.io is unreachable (timeout)")) == 1


def test_an_uncached_registrys_blackholed_upstream_costs_the_bound_once(outage_stack, module_upstream, cached):
    seen, _ = cached
    assert manifest(seen.name, seen.tag, host=GHCR)[0] == 200  # its challenge is known: the next goes straight on
    with blackholed(outage_stack, module_upstream):
        check_uncached_outage(outage_stack, seen)


def check_uncached_outage(stack: Stack, seen, reason: str = "timeout") -> None:
    """The request that finds the upstream down and the next both get regcache's 503, framed as
    registry JSON on raw sockets (the first used to get mitmproxy's HTML 502)."""
    request = raw_request(f"GET /v2/{seen.name}/manifests/{seen.tag} HTTP/1.1", host=GHCR)
    for bound in (BOUND + SLACK, SLACK):  # the exchange under way waits for the bound, the next not
        reply, took = timed(lambda: raw_exchange(PORT, request))
        [(status, headers, body)] = split_responses(reply, ["GET"])
        assert status == 503 and took < bound and headers["content-type"] == "application/json", reply[:300]
        error = json.loads(body)["errors"][0]
        assert error["code"] == "UNAVAILABLE" and "ghcr.io" in error["message"] and f"({reason})" in error["message"]
        assert "server" not in headers  # no mitmproxy page
    assert len(warnings(stack, f"of ghcr.io is unreachable ({reason})")) == 1


def test_an_uncached_registrys_stopped_upstream_is_503_json_from_the_first_request(outage_stack, module_upstream, cached):
    seen, _ = cached
    assert manifest(seen.name, seen.tag, host=GHCR)[0] == 200  # its challenge is known: the next goes straight on
    module_upstream.stop()
    try:
        check_uncached_outage(outage_stack, seen, "refused")
    finally:
        module_upstream.start()
        wait_until_back(outage_stack)


def test_an_upstream_whose_name_does_not_resolve_is_said_so_at_once(outage_stack):
    (status, _, body), took = timed(lambda: manifest("library/x", "1.0", host=f"quay.io.{TEST_DOMAIN}:{PORT}"))
    assert status == 503 and took < SLACK
    assert "(name lookup failed)" in json.loads(body)["errors"][0]["message"]
    assert json.loads(outage_stack.admin("/ready")[2])["upstreams"]["quay.io"] == "down: name lookup failed"


def test_the_upstream_back_is_said_once(outage_stack):
    assert warnings(outage_stack, "is reachable again")


def test_containerd_pulls_cached_images_and_falls_back_to_its_server_for_others(
        outage_stack, cached, upstream_down, tmp_path):
    seen, unseen = cached
    fallback = Upstream(tmp_path / "fallback", PORT + UPSTREAM_OFFSET + 1).start()
    containerd = Containerd(tmp_path / "containerd").start()
    try:
        fallback.push(unseen)
        hosts_dir = tmp_path / "certs.d"
        (hosts_dir / "docker.io").mkdir(parents=True)
        (hosts_dir / "docker.io/hosts.toml").write_text(hosts_toml(fallback.url, f"http://{DOCKER_IO}"))
        for image in (seen, unseen):
            result = containerd.pull(f"docker.io/{image.reference}", hosts_dir)
            assert result.returncode == 0, result.stderr
            assert containerd.image_digest(f"docker.io/{image.reference}") == image.manifest_digest
        assert fallback.requests_for(f"/v2/{seen.name}/") == []  # the cached image came from regcache
        assert fallback.requests_for(f"/v2/{unseen.name}/manifests/", "HEAD")
    finally:
        containerd.stop()
        fallback.stop()
