"""The disk budget, end to end: `regcache up` with REGCACHE_MAX_DISK=300M, images of about
100 MiB from the session upstream, evictions seen on the cache's disk, in the pull log and in
the upstream's access log."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
from urllib.parse import urlsplit

import pytest

from tests.support.parts import PORT_BASES, TEST_DOMAIN, build_image, cache_holds, docker_io_stack, poll, pull, storage_bytes

PORT = PORT_BASES["test_budget"]
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"
BUDGET = 300 << 20


@pytest.fixture(scope="module")
def more_images(tmp_path_factory, upstream) -> list:
    """Three images of one 95 MiB layer each, beside the session's 100 MiB `big`: three fit
    the budget, four do not."""
    workdir = tmp_path_factory.mktemp("budget-images")
    built = [build_image(workdir, f"library/budget{n}", [("layer.bin", 95 << 20)]) for n in (2, 3, 4)]
    for image in built:
        upstream.push(image)
    return built


@pytest.fixture(scope="module")
def budget_stack(tmp_path_factory, upstream):
    stack = docker_io_stack(tmp_path_factory.mktemp("budget-stack"), upstream, PORT, {
        "REGCACHE_MAX_DISK": "300M",
        # No spools: a finished one lingers for 30 s and would serve an evicted layer again
        # without the upstream, where these tests watch eviction and refetching alone.
        "REGCACHE_SPOOL_MAX_DISK": "0",
    }).start()
    yield stack
    assert stack.stop() == 0


def storage(stack):
    return stack.data_dir / "dockerhub" / "storage"


def layer(image) -> str:
    return image.blob_digests[-1]


def held(stack, image) -> bool:
    return cache_holds(storage(stack), layer(image), timeout=0)


def settled(stack, image):
    """Waits until `image`'s layer is stored and the storage is back under the budget."""
    return poll(lambda: (held(stack, image), storage_bytes(storage(stack))),
                lambda state: state[0] and state[1] <= BUDGET, timeout=60, every=0.5)


def what_happened(stack, images) -> str:
    """For a failed eviction order: the budget's lines, the storage's files of 1 MiB or more
    (size and mtime: a partial upload counts too), and when each image's layer was pulled."""
    names = {layer(image): image.name for image in images}
    budget = [line for line in stack.output if "disk budget" in line or "record" in line]
    files = [f"{path.relative_to(storage(stack))} {path.stat().st_size} {path.stat().st_mtime:.3f}"
             for path in sorted(storage(stack).rglob("*")) if path.is_file() and path.stat().st_size >= 1 << 20]
    pulls = [f"{names[r['reference']]} {r['time']} {r['status']} {r['cache']} {r['backend']} {r['duration_ms']} ms"
             for r in stack.pull_records() if r["reference"] in names]
    return "\n".join(["budget:", *budget, "files:", *files, "layer pulls:", *pulls])


def test_least_recently_used_image_is_evicted_and_comes_back_as_a_miss(budget_stack, upstream, images, more_images,
                                                                       tmp_path):
    first, second, third, fourth = images["big"], *more_images
    for n, image in enumerate((first, second, third, first, fourth)):
        assert pull(DOCKER_IO, image.reference, tmp_path / f"pull{n}") == image.manifest_digest
        assert settled(budget_stack, image)[0]
    assert settled(budget_stack, fourth)[1] <= BUDGET
    story = what_happened(budget_stack, (first, second, third, fourth))
    assert held(budget_stack, first), f"the first image was pulled again after the second: it stays\n{story}"
    assert not held(budget_stack, second), f"the second image was used least recently: it goes\n{story}"
    # The run's line is printed once it has evicted: read the output until it is there.
    assert poll(lambda: budget_stack.output, lambda out: any(line.startswith("regcache: disk budget: evicted") for line in out))
    metrics = budget_stack.metrics()
    assert metrics[("regcache_evicted_bytes_total", (("registry", "docker.io"),))] >= 95 << 20
    assert metrics[("regcache_eviction_skipped_blobs_total", (("registry", "docker.io"),))] == 0, "no pull was reading"
    assert metrics[("regcache_disk_budget_bytes", ())] == BUDGET

    fetched = len(upstream.requests_for(layer(second), "GET"))
    before = len(budget_stack.pull_records())
    assert pull(DOCKER_IO, second.reference, tmp_path / "again") == second.manifest_digest
    records = budget_stack.records_of_pull(second, before)
    assert {r["cache"] for r in records if r["reference"] == layer(second) and r["method"] == "GET"} == {"miss"}
    assert len(upstream.requests_for(layer(second), "GET")) > fetched
    assert settled(budget_stack, second)[1] <= BUDGET


def test_a_pull_in_flight_while_eviction_runs_completes(budget_stack, images, more_images, tmp_path):
    """A slow client reads the least recently used blob while a new image pushes the cache past
    its budget: eviction runs and the client gets all of the blob. The warm layer comes from the
    data plane (the proxy answers 307), which opened the file before sending: evicted meanwhile,
    its bytes stay readable until the transfer ends."""
    first, second, third, fourth = images["big"], *more_images
    for n, image in enumerate((first, fourth, second)):  # all three held, the first used least recently
        pull(DOCKER_IO, image.reference, tmp_path / f"warm{n}")
        assert settled(budget_stack, image)[0]
    redirect = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    redirect.request("GET", f"/v2/{first.name}/blobs/{layer(first)}", headers={"Host": DOCKER_IO})
    answer = redirect.getresponse()
    assert answer.status == 307
    location = urlsplit(answer.getheader("Location"))
    redirect.close()
    connection = http.client.HTTPConnection("127.0.0.1", location.port, timeout=60)
    connection.request("GET", f"{location.path}?{location.query}")
    response = connection.getresponse()
    assert response.status == 200
    digest = hashlib.sha256(response.read(1 << 20))
    try:
        lines = len(budget_stack.output)
        assert pull(DOCKER_IO, third.reference, tmp_path / "third") == third.manifest_digest
        assert settled(budget_stack, third)[1] <= BUDGET
        assert poll(lambda: budget_stack.output[lines:], lambda out: any("disk budget: evicted" in line for line in out))
        while chunk := response.read(1 << 20):
            digest.update(chunk)
    finally:
        connection.close()
    assert f"sha256:{digest.hexdigest()}" == layer(first)


def test_cache_du_and_ls_show_what_the_cache_holds(budget_stack, images, tmp_path):
    image = images["small"]
    pull(DOCKER_IO, image.reference, tmp_path / "small")
    assert poll(lambda: all(cache_holds(storage(budget_stack), d, timeout=0) for d in image.blob_digests), bool)
    # The cache may still be storing the manifest it just served: compare once the storage is still.
    du, on_disk = poll(lambda: (json.loads(budget_stack.command("cache", "du", "--json").stdout), storage_bytes(storage(budget_stack))),
                       lambda seen: seen[0]["caches"][0]["bytes"] == seen[1])
    [cache] = du["caches"]
    assert cache["registry"] == "docker.io" and du["budget"] == BUDGET and cache["free_disk"] > 0
    assert cache["bytes"] == on_disk
    assert {r["repository"] for r in cache["repositories"]} >= {"library/small"}
    ls = json.loads(budget_stack.command("cache", "ls", "--json").stdout)
    [small] = [r for r in ls["caches"][0]["repositories"] if r["repository"] == "library/small"]
    assert [(t["tag"], t["digest"]) for t in small["tags"]] == [("1.0", image.manifest_digest)]
    assert poll(lambda: json.loads(budget_stack.command("cache", "ls", "--json").stdout),
                lambda doc: all(t["last_pulled"] for r in doc["caches"][0]["repositories"]
                                if r["repository"] == "library/small" for t in r["tags"]))
    table = budget_stack.command("cache", "ls").stdout
    assert "docker.io/library/small" in table and "last pulled" in table.splitlines()[0]
    assert "all caches" in budget_stack.command("cache", "du").stdout


def test_cache_ls_into_a_closed_pipe_prints_no_traceback(budget_stack):
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = budget_stack.command("cache", "ls", stdout=writer)
    finally:
        os.close(writer)
    assert result.returncode == 141 and result.stderr == "", result.stderr  # 141: as a shell reports SIGPIPE
