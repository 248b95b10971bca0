"""`regcache prefetch` through the session stack: images it warmed are then pulled with no
blob GET upstream; a reference that cannot be fetched is named, with exit status 1."""

from __future__ import annotations

import pytest

from regcache_core.commands.prefetch import ImageReference, PrefetchError, parse_platforms, parse_reference

from parts import PORT_BASES, TEST_DOMAIN, build_image, build_multiarch_image, cache_holds, pull

PORT = PORT_BASES["session"]
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"


@pytest.fixture(scope="module")
def cold_images(tmp_path_factory, upstream):
    """Images no other test pulls: a single-platform one and a two-platform index."""
    workdir = tmp_path_factory.mktemp("prefetch-images")
    single = build_image(workdir, "library/prefetch-single", [("etc/single", b"prefetched\n")])
    upstream.push(single)
    multi = build_multiarch_image(workdir, "library/prefetch-multi", "1.0", ["amd64", "arm64"])
    upstream.push_multiarch(multi)
    return single, multi


def blob_gets(upstream, digests) -> int:
    return sum(len(upstream.requests_for(digest, "GET")) for digest in digests)


def test_prefetched_images_are_pulled_without_upstream_blob_fetches(stack, upstream, cold_images, tmp_path):
    single, multi = cold_images
    listed = tmp_path / "images.txt"
    listed.write_text(f"# warm these\ndocker.io/{multi.reference}\n")
    result = stack.command("prefetch", f"docker.io/{single.reference}", "--file", str(listed), "--jobs", "2")
    assert result.returncode == 0, result.stderr
    assert "linux/amd64" in result.stdout and "linux/arm64" in result.stdout
    storage = stack.data_dir / "dockerhub" / "storage"
    digests = [*single.blob_digests, *multi.blob_digests]
    assert all(cache_holds(storage, digest) for digest in digests)
    before = blob_gets(upstream, digests)
    assert pull(DOCKER_IO, single.reference, tmp_path / "single") == single.manifest_digest
    assert pull(DOCKER_IO, multi.reference, tmp_path / "multi", "--all") == multi.index_digest
    assert blob_gets(upstream, digests) == before


def test_prefetch_names_what_failed_and_exits_1(stack, images):
    result = stack.command("prefetch", "docker.io/library/never-pushed:1.0", f"docker.io/{images['small'].reference}",
                           "--platform", "linux/amd64")
    assert result.returncode == 1
    assert "1 failed: docker.io/library/never-pushed:1.0: manifest 1.0: 404" in result.stderr.replace("\n", " ")
    assert stack.command("prefetch", "not a reference").returncode == 2


@pytest.mark.parametrize("text, expected", [
    ("nginx", ImageReference("docker.io", "library/nginx", "latest")),
    ("docker.io/library/nginx:1.27", ImageReference("docker.io", "library/nginx", "1.27")),
    ("bitnami/redis:7", ImageReference("docker.io", "bitnami/redis", "7")),
    ("ghcr.io/org/app@sha256:" + "a" * 64, ImageReference("ghcr.io", "org/app", "sha256:" + "a" * 64)),
    ("registry.local:5000/team/app:v1", ImageReference("registry.local:5000", "team/app", "v1")),
])
def test_image_references(text, expected):
    assert parse_reference(text) == expected


@pytest.mark.parametrize("text", ["", "Nginx", "docker.io//x", "ghcr.io/org/app@sha256:short", "x:bad tag"])
def test_bad_image_references_are_refused(text):
    with pytest.raises(PrefetchError, match="is not an image reference"):
        parse_reference(text)


def test_platforms():
    assert parse_platforms(None) is None
    assert parse_platforms("linux/amd64, linux/arm64/v8") == {"linux/amd64", "linux/arm64/v8"}
    with pytest.raises(PrefetchError, match="'amd64' is not os/architecture"):
        parse_platforms("amd64")
