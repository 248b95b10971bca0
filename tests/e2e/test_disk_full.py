"""A cache whose disk is full: /ready says which cache and why, once in the log, and images it
holds are still served. The cache's folder is a small tmpfs of the test's mount namespace."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.parts import PORT_BASES, TEST_DOMAIN, docker_io_stack, pull

PORT = PORT_BASES["test_disk_full"]
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"


@pytest.fixture
def small_disk_stack(tmp_path, upstream):
    cache_dir = tmp_path / "data" / "dockerhub"
    cache_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(cache_dir)], check=True)
    try:
        stack = docker_io_stack(tmp_path, upstream, PORT, {"REGCACHE_MIN_FREE_DISK": "1M"}).start()
        try:
            yield stack, cache_dir
        finally:
            stack.stop()
    finally:
        subprocess.run(["umount", str(cache_dir)], check=True)


def fill(folder) -> None:
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass  # ENOSPC: full


def test_full_disk_is_not_ready_with_the_reason_and_cached_images_are_served(small_disk_stack, images, tmp_path):
    stack, cache_dir = small_disk_stack
    image = images["small"]
    assert pull(DOCKER_IO, image.reference, tmp_path / "first") == image.manifest_digest
    assert stack.admin("/ready")[0] == 200
    fill(cache_dir)
    answers = [stack.admin("/ready") for _ in range(3)]
    assert {status for status, _, _ in answers} == {503}
    reason = json.loads(answers[0][2])["backends"]["docker.io"]
    assert reason.startswith("disk full") and str(cache_dir) in reason
    assert pull(DOCKER_IO, image.reference, tmp_path / "again") == image.manifest_digest
    warnings = [line for line in stack.output if "cannot store new content" in line]
    assert len(warnings) == 1, stack.output
    (cache_dir / "filler").unlink()
    assert stack.admin("/ready")[0] == 200
