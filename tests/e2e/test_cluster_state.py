"""End to end: two `regcache up` replicas sharing one redis-server and one cache storage
(K_STORAGE), in front of one token upstream (its blobs redirected to a CDN, as Docker Hub does).
Tags, cold manifests and the upstream's state are the cluster's: what reached the upstream is
read from its access log, whichever replica the clients asked. Redis killed under load fails
(or paused) no pull and is said once per replica; once it is back, the replicas share state again. The disk
budget evicts what the cluster pulled least recently from the storage the replicas share.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.fakes import TokenServer, token_upstream
from tests.support.parts import (
    MANIFEST_TYPES, PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, Upstream, at_once, build_image, build_multiarch_image,
    cache_holds, docker_io_stack, http_get, poll, push_index, skopeo, storage_bytes,
)
from tests.support.redis_server import RedisServer

PORT = PORT_BASES["test_cluster_state"]
PORTS = (PORT, PORT_BASES["test_cluster_state[second replica]"])
UPSTREAM_PORT = PORT + UPSTREAM_OFFSET
USER, PASSWORD = "cluster-user", "cluster-password"
TTL = 3.0
BUDGET = 40 << 20  # three of the budget test's 11 MiB images fit, four do not: one goes
REDIS_DOWN = "unreachable"  # in the link's warning line


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(token upstream, the two replicas, redis-server, token server)."""
    tmp = tmp_path_factory.mktemp("cluster")
    upstream, token_server, cdn = token_upstream(tmp, UPSTREAM_PORT, USER, PASSWORD)
    redis = RedisServer(tmp / "redis", UPSTREAM_PORT + 3).start()
    settings = {"DOCKERHUB_USERNAME": USER, "DOCKERHUB_PASSWORD": PASSWORD, "REGCACHE_TAG_TTL": str(TTL),
                "DOCKERHUB_STORAGE": str(tmp / "shared-storage"), "REGCACHE_MAX_DISK": "40M", "REGCACHE_REDIS_URL": redis.url,
                "REGCACHE_CLUSTER_SECRET": "e2e-cluster-secret-0123456789"}
    replicas = []
    try:
        for index, port in enumerate(PORTS):
            replicas.append(docker_io_stack(tmp / f"replica-{index}", upstream, port, settings).start())
        yield upstream, replicas, redis, token_server
    finally:
        for replica in replicas:
            replica.stop()
        for part in (upstream, cdn, token_server, redis):
            part.stop()


def host(port: int) -> str:
    return f"docker.io.{TEST_DOMAIN}:{port}"


def manifest(port: int, name: str, reference: str) -> tuple[int, dict, bytes]:
    return http_get(f"http://127.0.0.1:{port}/v2/{name}/manifests/{reference}", host=host(port),
                    headers={"Accept": MANIFEST_TYPES})


def pulled_digest(port: int, reference: str, destination) -> tuple[int, str, str | None]:
    """skopeo copy through one replica: (exit status, its error output, the manifest digest it stored)."""
    result = skopeo("copy", "--src-tls-verify=false", f"docker://{host(port)}/{reference}", f"oci:{destination}", timeout=180)
    if result.returncode != 0:
        return result.returncode, result.stderr, None
    return 0, "", json.loads((destination / "index.json").read_text())["manifests"][0]["digest"]


def manifest_requests(upstream: Upstream, since: int, references) -> tuple[list, list]:
    asked = [line for line in upstream.access_log()[since:]
             if "/manifests/" in line.path and line.path.rsplit("/", 1)[1] in references]
    return [line for line in asked if line.method == "HEAD"], [line for line in asked if line.method == "GET"]


def cold_pulls_over_the_replicas(upstream: Upstream, token_server: TokenServer, tmp_path, name: str) -> None:
    """8 concurrent cold pulls of a multi-arch tag, alternately through each replica: every one
    gets the right digest; at most one HEAD and one GET upstream per manifest for them all."""
    image = build_multiarch_image(tmp_path / "image", name, "1.0", ["amd64", "arm64"])
    for platform in image.platforms.values():
        upstream.push(platform)
    push_index(image, upstream.url, authorization=token_server.bearer(USER, f"repository:{image.name}:pull,push"))
    amd64 = image.platforms["amd64"]
    since = len(upstream.access_log())
    results = at_once(8, lambda i: pulled_digest(PORTS[i % 2], image.reference, tmp_path / f"pulled-{i}"))
    assert results == [(0, "", amd64.manifest_digest)] * 8
    for references in ((image.tag, image.index_digest), (amd64.manifest_digest,)):
        heads, gets = manifest_requests(upstream, since, references)
        assert len(heads) <= 1 and len(gets) <= 1, (references, heads, gets)


def test_tag_gets_over_the_replicas_ask_upstream_nothing_within_the_ttl_and_once_after(world, tmp_path):
    upstream, replicas, _, _ = world
    image = build_image(tmp_path / "image", "library/shared-tag", [("etc/content", b"shared tag")])
    upstream.push(image)
    # Each replica learns the upstream's challenge (`GET /v2/`) with its first request there, as
    # one in service has: the second one's, with another image, before counting.
    other = build_image(tmp_path / "other", "library/other-tag", [("etc/content", b"other tag")])
    upstream.push(other)
    assert pulled_digest(PORTS[1], other.reference, tmp_path / "other-pull") == (0, "", other.manifest_digest)
    assert pulled_digest(PORTS[0], image.reference, tmp_path / "first") == (0, "", image.manifest_digest)
    since = len(upstream.access_log())
    answers = [manifest(PORTS[i % 2], image.name, image.tag) for i in range(50)]
    assert {(status, headers["Docker-Content-Digest"]) for status, headers, _ in answers} == {(200, image.manifest_digest)}
    assert upstream.access_log()[since:] == [], "a tag learnt by one replica is fresh on the other"
    time.sleep(TTL + 0.5)
    since = len(upstream.access_log())
    answers = at_once(50, lambda i: manifest(PORTS[i % 2], image.name, image.tag))
    assert {(status, headers["Docker-Content-Digest"]) for status, headers, _ in answers} == {(200, image.manifest_digest)}
    asked = [(line.method, line.path) for line in upstream.access_log()[since:]]
    assert asked == [("HEAD", f"/v2/{image.name}/manifests/{image.tag}")], "one revalidation for the cluster"


def test_concurrent_cold_pulls_over_the_replicas_make_one_upstream_request_per_manifest(world, tmp_path):
    upstream, _, _, token_server = world
    cold_pulls_over_the_replicas(upstream, token_server, tmp_path, "library/rollout")


@pytest.mark.parametrize("outage", ["killed", "paused"])
def test_redis_gone_under_load_fails_no_pull_is_said_once_and_sharing_resumes_when_it_is_back(world, tmp_path, outage):
    """Killed: connections refused. Paused (SIGSTOP): it accepts connections and answers nothing,
    so the call that finds it so waits REGCACHE_REDIS_TIMEOUT, and no other call does."""
    upstream, replicas, redis, token_server = world
    image = build_image(tmp_path / "image", f"library/redis-{outage}", [("etc/content", outage.encode())])
    upstream.push(image)
    assert pulled_digest(PORTS[0], image.reference, tmp_path / "warm")[0] == 0
    lines_before = [len(replica.output) for replica in replicas]

    def pull_while(index: int) -> list:
        got = []
        for round_ in range(6):
            got.append(pulled_digest(PORTS[index % 2], image.reference, tmp_path / f"load-{index}-{round_}"))
            got.append(manifest(PORTS[index % 2], image.name, image.tag)[0])
            if index == 0 and round_ == 1:
                redis.kill() if outage == "killed" else redis.pause()
        return got

    try:
        results = at_once(4, pull_while)
        assert {r for got in results for r in got} == {(0, "", image.manifest_digest), 200}, "no pull failed"
        for replica in replicas:
            status, _, body = replica.admin("/ready")
            assert status == 200 and json.loads(body)["shared_state"].startswith("down")
    finally:
        if redis.process is None:  # killed
            redis.start()
        else:
            redis.resume()
    for replica in replicas:
        poll(lambda: json.loads(replica.admin("/ready")[2])["shared_state"], lambda state: state == "ok", timeout=30)
    for replica, before in zip(replicas, lines_before):
        said = [line for line in replica.output[before:] if "shared state" in line]
        assert [REDIS_DOWN in line for line in said] == [True, False], said  # once down, once back
    cold_pulls_over_the_replicas(upstream, token_server, tmp_path, f"library/after-redis-{outage}")


def test_the_budget_evicts_what_the_cluster_pulled_least_recently_from_the_shared_storage(world, tmp_path):
    """p is pulled through the first replica, q through the second, r through the first; then p
    again through the second and q through the first, and w pushes the storage past the budget.
    By the cluster's pulls r goes; by either replica's own, p or q would."""
    upstream, replicas, _, _ = world
    storage = Path(replicas[0].settings["DOCKERHUB_STORAGE"])
    images = {}
    for name in "pqrw":
        images[name] = build_image(tmp_path / name, f"library/budget-{name}", [("layer.bin", 11 << 20)])
        upstream.push(images[name])

    def held(name: str) -> bool:
        return cache_holds(storage, images[name].blob_digests[-1], timeout=0)

    pulled = {}
    for step, (name, replica) in enumerate((("p", 0), ("q", 1), ("r", 0), ("p", 1), ("q", 0), ("w", 1))):
        pulled[name, replica] = time.time()
        assert pulled_digest(PORTS[replica], images[name].reference, tmp_path / f"pull-{step}") == (0, "", images[name].manifest_digest)
        assert poll(lambda: held(name), bool, timeout=30)
    assert poll(lambda: storage_bytes(storage), lambda used: used <= BUDGET, timeout=60, every=0.5) <= BUDGET
    evicted = poll(lambda: [(index, line) for index, replica in enumerate(replicas) for line in replica.output
                            if "disk budget: evicted" in line], bool)
    assert [held(name) for name in "pqrw"] == [True, True, False, True], ("r was the cluster's least recently pulled", evicted)
    # `regcache cache ls` on the first replica says when p was last pulled: through the second
    ls = json.loads(replicas[0].command("cache", "ls", "--json").stdout)
    [p] = [r for r in ls["caches"][0]["repositories"] if r["repository"] == images["p"].name]
    [tag] = p["tags"]
    assert datetime.fromisoformat(tag["last_pulled"]).timestamp() >= int(pulled["p", 1])
