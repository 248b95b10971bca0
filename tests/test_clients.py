"""Real clients pull through regcache with the files `regcache client-config` wrote for them:
containerd (what k3s/k3d nodes run) by virtual host and by one ?ns= endpoint, Docker Engine
through registry-mirrors, and skopeo through registries.conf; containerd also falls back to the
upstream for a registry regcache does not map and for one whose cache is down; podman reads
the same registries.conf as skopeo. Multi-arch images
(an OCI image index, as almost every docker.io image is) go through whole, or one platform of them.
A warm 100 MiB layer comes from the data plane: each client follows the proxy's 307 to it.

One stack for the module: docker.io is cached (its upstream is the session's local registry);
quay.io is mapped to a cache on another host that is not running.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import tomllib

import pytest
from ruamel.yaml import YAML

from clients import Containerd, Dockerd
from parts import PORT_BASES, REMOTE_CACHE_HOST, TEST_DOMAIN, Stack, cache_holds, docker_io_stack, http_get, pull, skopeo
from regcache_core.commands.client_config import hosts_toml
from regcache_core.dataplane.server import BACKEND as DATAPLANE

PORT = PORT_BASES["test_clients"]
ENDPOINT = f"http://127.0.0.1:{PORT}"
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"


@pytest.fixture(scope="module")
def client_stack(tmp_path_factory, upstream) -> Stack:
    stack = docker_io_stack(tmp_path_factory.mktemp("client-stack"), upstream, PORT, {
        "REGCACHE_REGISTRIES": "DOCKERHUB,QUAY",
        "QUAY_UPSTREAM": upstream.url,
        "QUAY_CACHE": f"http://{REMOTE_CACHE_HOST}:{PORT + 3}",  # nothing listens there
    }).start()
    yield stack
    assert stack.stop() == 0


@pytest.fixture(scope="module")
def generated(client_stack, tmp_path_factory) -> dict:
    """The client files for both ways of addressing regcache."""
    return {
        "virtual-hosts": client_stack.client_config(tmp_path_factory.mktemp("virtual-hosts")),
        "endpoint": client_stack.client_config(tmp_path_factory.mktemp("endpoint"), "--endpoint", ENDPOINT),
    }


@pytest.fixture
def containerd(tmp_path):
    daemon = Containerd(tmp_path / "containerd").start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def warm_big(client_stack, images):
    """The big image in the cache, so that its 100 MiB layer goes by the data plane."""
    image = images["big"]
    for digest in image.blob_digests:
        status, _, _ = http_get(f"http://{DOCKER_IO}/v2/{image.name}/blobs/{digest}", timeout=120)
        assert status == 200 and cache_holds(client_stack.data_dir / "dockerhub/storage", digest)
    return image


def sent_by_the_data_plane(stack: Stack, image, before: int) -> dict:
    """The data plane's record of the image's big layer, once it is in the pull log."""
    layer = image.blob_digests[-1]

    def records(all_records):
        return [r for r in all_records[before:] if r["reference"] == layer and r["backend"] == DATAPLANE]

    found = records(stack.pull_records_until(records))
    assert found, f"no record of {layer} sent by the data plane"
    return found[-1]


def assert_layer_sent_whole(record: dict, image, upstream) -> None:
    size = int(http_get(f"{upstream.url}/v2/{image.name}/blobs/{image.blob_digests[-1]}", method="HEAD")[1]["Content-Length"])
    assert (record["method"], record["status"], record["bytes"], record["cache"]) == ("GET", 200, size, "hit")


def served(records: list[dict]) -> set[tuple]:
    """(method, kind, reference) of the requests answered with 200."""
    return {(r["method"], r["kind"], r["reference"]) for r in records if r["status"] == 200}


def blob_gets(image) -> set[tuple]:
    return {("GET", "blob", digest) for digest in image.blob_digests}


@pytest.mark.parametrize("style, mirror", [
    ("virtual-hosts", f"http://{DOCKER_IO}"),
    ("endpoint", ENDPOINT),
])
def test_generated_files_parse(generated, upstream, style, mirror):
    out = generated[style]
    hosts = tomllib.loads((out / "certs.d/docker.io/hosts.toml").read_text())
    assert hosts["server"] == upstream.url
    assert hosts["host"] == {mirror: {"capabilities": ["pull", "resolve"]}}
    assert set(p.parent.name for p in out.glob("certs.d/*/hosts.toml")) == {"docker.io", "quay.io"}
    k3s = YAML(typ="safe").load(out / "registries.yaml")
    assert k3s["mirrors"]["docker.io"] == {"endpoint": [mirror]}
    # Docker and skopeo send no ?ns=, so they always get virtual host names.
    daemon = json.loads((out / "daemon.json").read_text())
    assert daemon == {"registry-mirrors": [f"http://{DOCKER_IO}"], "insecure-registries": [DOCKER_IO]}
    conf = tomllib.loads((out / "registries.conf").read_text())
    assert conf["registry"][0] == {"prefix": "docker.io", "location": "docker.io",
                                   "mirror": [{"location": DOCKER_IO, "insecure": True}]}


@pytest.mark.parametrize("style", ["virtual-hosts", "endpoint"])
def test_containerd_pulls_through_regcache(client_stack, generated, containerd, images, style):
    image = images["small"]
    reference = f"docker.io/{image.reference}"
    before = len(client_stack.pull_records())
    result = containerd.pull(reference, generated[style] / "certs.d")
    assert result.returncode == 0, result.stderr
    assert containerd.image_digest(reference) == image.manifest_digest
    assert containerd.unpacked(reference)

    records = client_stack.records_of_pull(image, before)
    assert {r["registry"] for r in records} == {"docker.io"}  # by ?ns= alone, in the endpoint style
    # containerd resolves the tag with HEAD, then GETs by digest.
    assert {("HEAD", "manifest", image.tag), ("GET", "manifest", image.manifest_digest)} | blob_gets(image) <= served(records)


@pytest.mark.parametrize("mirror, answered", [
    (f"http://unmapped.io.{TEST_DOMAIN}:{PORT}", True),  # regcache answers 404 NAME_UNKNOWN
    (f"http://127.0.0.1:{PORT + 99}", False),  # regcache is not running: the connection is refused
])
def test_containerd_falls_back_to_upstream_for_unmapped_registry(client_stack, containerd, upstream, images,
                                                                  tmp_path, mirror, answered):
    """A hand-written hosts.toml for a registry regcache does not map: containerd asks its server."""
    image = images["small"]
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "unmapped.io").mkdir(parents=True)
    (hosts_dir / "unmapped.io/hosts.toml").write_text(hosts_toml(upstream.url, mirror))
    before = len(client_stack.pull_records())
    result = containerd.pull(f"unmapped.io/{image.reference}", hosts_dir)
    assert result.returncode == 0, result.stderr
    assert containerd.image_digest(f"unmapped.io/{image.reference}") == image.manifest_digest
    # Answered or not, the pull succeeded; only an answered request leaves a record to wait for.
    refused = client_stack.records_after(before) if answered else client_stack.pull_records()[before:]
    assert bool(refused) == answered and {(r["status"], r["backend"]) for r in refused} <= {(404, None)}


def test_containerd_falls_back_to_upstream_when_cache_is_down(client_stack, generated, containerd, images):
    """quay.io's cache does not answer: regcache says 502 at once and containerd asks the server."""
    image = images["small"]
    reference = f"quay.io/{image.reference}"
    before = len(client_stack.pull_records())
    result = containerd.pull(reference, generated["virtual-hosts"] / "certs.d")
    assert result.returncode == 0, result.stderr
    assert containerd.image_digest(reference) == image.manifest_digest
    failed = client_stack.records_after(before)
    assert failed and {(r["registry"], r["status"]) for r in failed} == {("quay.io", 502)}


def docker_pull(stack: Stack, generated, containerd, image, tmp_path) -> int:
    """`docker pull` of `image` by dockerd with the generated daemon.json, checked as a user
    would (image ID, repo digest); returns the pull log's length before it."""
    dockerd = Dockerd(tmp_path / "docker", generated["virtual-hosts"] / "daemon.json", containerd).start()
    try:
        before = len(stack.pull_records())
        # Docker Hub is out of reach here: the pull can only succeed through the mirror.
        result = dockerd.docker("pull", f"docker.io/{image.reference}")
        assert result.returncode == 0, result.stderr
        inspected = dockerd.inspect(f"docker.io/{image.reference}")
    finally:
        dockerd.stop()
    assert inspected["Id"] == image.blob_digests[0]  # the image ID is its config's digest
    assert f"{image.name.removeprefix('library/')}@{image.manifest_digest}" in inspected["RepoDigests"]
    return before


def test_docker_pulls_through_registry_mirror(client_stack, generated, containerd, images, tmp_path):
    image = images["small"]
    before = docker_pull(client_stack, generated, containerd, image, tmp_path)
    records = client_stack.records_of_pull(image, before)
    assert (records[0]["method"], records[0]["kind"], records[0]["status"]) == ("GET", "ping", 200)
    assert {r["registry"] for r in records} == {"docker.io"}
    assert {("HEAD", "manifest", image.tag), ("GET", "manifest", image.manifest_digest)} | blob_gets(image) <= served(records)


def test_skopeo_pulls_through_registries_conf_mirror(client_stack, generated, images, tmp_path):
    image = images["small"]
    before = len(client_stack.pull_records())
    result = skopeo("--registries-conf", str(generated["virtual-hosts"] / "registries.conf"), "copy",
                    f"docker://docker.io/{image.reference}", f"oci:{tmp_path / 'pulled'}:{image.tag}")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "pulled/index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    records = client_stack.records_of_pull(image, before)
    assert {r["registry"] for r in records} == {"docker.io"} and blob_gets(image) <= served(records)


def test_skopeo_copies_every_platform_of_an_index(client_stack, multiarch_image, tmp_path):
    image = multiarch_image
    before = len(client_stack.pull_records())
    layout = tmp_path / "pulled"
    assert pull(DOCKER_IO, image.reference, layout, "--all", "--preserve-digests") == image.index_digest
    index = json.loads((layout / "blobs" / image.index_digest.replace(":", "/")).read_bytes())
    assert [m["digest"] for m in index["manifests"]] == [p.manifest_digest for p in image.platforms.values()]
    for platform in image.platforms.values():
        assert (layout / "blobs" / platform.manifest_digest.replace(":", "/")).is_file()
    records = client_stack.records_of_pull(image, before)
    # The tag resolves to the index; each platform's manifest is then asked for by digest.
    manifests = {("GET", "manifest", image.tag)} | {("GET", "manifest", p.manifest_digest) for p in image.platforms.values()}
    assert manifests | blob_gets(image) <= served(records)


def test_containerd_pulls_its_platform_of_an_index(client_stack, generated, containerd, multiarch_image):
    image, amd64, arm64 = multiarch_image, multiarch_image.platforms["amd64"], multiarch_image.platforms["arm64"]
    reference = f"docker.io/{image.reference}"
    before = len(client_stack.pull_records())
    result = containerd.pull(reference, generated["virtual-hosts"] / "certs.d")  # linux/amd64: ctr's default
    assert result.returncode == 0, result.stderr
    assert containerd.image_digest(reference) == image.index_digest
    assert containerd.unpacked(reference)

    records = client_stack.records_of_pull(amd64, before)
    expected = {("HEAD", "manifest", image.tag), ("GET", "manifest", image.index_digest),
                ("GET", "manifest", amd64.manifest_digest)} | blob_gets(amd64)
    assert expected <= served(records)
    assert not {r["reference"] for r in records} & {arm64.manifest_digest, *arm64.blob_digests}


def test_skopeo_lists_tags_of_the_upstream(client_stack, upstream, multiarch_image):
    result = skopeo("list-tags", "--tls-verify=false", f"docker://{DOCKER_IO}/{multiarch_image.name}")
    assert result.returncode == 0, result.stderr
    status, _, body = http_get(f"{upstream.url}/v2/{multiarch_image.name}/tags/list")
    assert status == 200
    upstream_tags = json.loads(body)["tags"]
    assert sorted(json.loads(result.stdout)["Tags"]) == sorted(upstream_tags)
    assert {multiarch_image.tag, *(p.tag for p in multiarch_image.platforms.values())} <= set(upstream_tags)


def test_skopeo_pulls_an_index_by_digest(client_stack, multiarch_image, tmp_path):
    """Without --all skopeo picks its own platform (linux/amd64) out of the index it asked for by digest."""
    image = multiarch_image
    amd64 = image.platforms["amd64"]
    before = len(client_stack.pull_records())
    assert pull(DOCKER_IO, f"{image.name}@{image.index_digest}", tmp_path / "pulled") == amd64.manifest_digest
    records = client_stack.records_of_pull(amd64, before)
    assert {("GET", "manifest", image.index_digest), ("GET", "manifest", amd64.manifest_digest)} <= served(records)


def test_podman_pulls_through_registries_conf_mirror(client_stack, generated, images, tmp_path):
    """podman (Debian's) reads the same registries.conf as skopeo; its storage, run state and
    events stay under tmp_path (vfs driver, no systemd)."""
    image = images["small"]
    before = len(client_stack.pull_records())
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
           "CONTAINERS_REGISTRIES_CONF": str(generated["virtual-hosts"] / "registries.conf")}
    # podman refuses a run root path over 50 characters; pytest's tmp_path is longer.
    with tempfile.TemporaryDirectory(prefix="podman-") as run_root:
        podman = ["podman", "--root", str(tmp_path / "root"), "--runroot", run_root, "--storage-driver", "vfs",
                  "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--tmpdir", str(tmp_path / "tmp")]
        result = subprocess.run([*podman, "pull", "-q", f"docker.io/{image.reference}"], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        digest = subprocess.run([*podman, "image", "inspect", "--format", "{{.Digest}}", f"docker.io/{image.reference}"],
                                env=env, capture_output=True, text=True, timeout=60).stdout.strip()
        assert digest == image.manifest_digest
    records = client_stack.records_of_pull(image, before)
    assert {r["registry"] for r in records} == {"docker.io"} and blob_gets(image) <= served(records)


@pytest.mark.parametrize("style", ["virtual-hosts", "endpoint"])
def test_containerd_pulls_a_big_layer_from_the_data_plane(client_stack, generated, containerd, warm_big, upstream, style):
    image = warm_big
    reference = f"docker.io/{image.reference}"
    before = len(client_stack.pull_records())
    result = containerd.pull(reference, generated[style] / "certs.d")
    assert result.returncode == 0, result.stderr
    assert containerd.image_digest(reference) == image.manifest_digest
    assert containerd.unpacked(reference)  # containerd checks every layer's digest as it unpacks
    assert_layer_sent_whole(sent_by_the_data_plane(client_stack, image, before), image, upstream)


def test_docker_pulls_a_big_layer_from_the_data_plane(client_stack, generated, containerd, warm_big, upstream, tmp_path):
    image = warm_big
    before = docker_pull(client_stack, generated, containerd, image, tmp_path)
    assert_layer_sent_whole(sent_by_the_data_plane(client_stack, image, before), image, upstream)


def test_skopeo_pulls_a_big_layer_from_the_data_plane(client_stack, generated, warm_big, upstream, tmp_path):
    image = warm_big
    before = len(client_stack.pull_records())
    result = skopeo("--registries-conf", str(generated["virtual-hosts"] / "registries.conf"), "copy",
                    f"docker://docker.io/{image.reference}", f"oci:{tmp_path / 'pulled'}:{image.tag}")
    assert result.returncode == 0, result.stderr  # skopeo checks every blob's digest
    index = json.loads((tmp_path / "pulled/index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    assert_layer_sent_whole(sent_by_the_data_plane(client_stack, image, before), image, upstream)
