"""The e2e lane's set-up: a private network and mount namespace, a shared upstream, seeded images.

The whole pytest process moves into new namespaces once this lane is collected, before any test
runs, so every server it starts listens on a loopback of its own (no port can collide with
anything on the machine), and /etc/hosts is ours to point test names at 127.0.0.1. This needs
root, as CI has. The unit lane never loads this file: it runs as any user, outside namespaces.
"""

from __future__ import annotations

import os

import pytest

from tests.support.parts import (
    PORT_BASES, REMOTE_CACHE_HOST, TEST_DOMAIN, UPSTREAM_OFFSET, MultiArchImage, Stack, Upstream, build_image,
    build_multiarch_image, docker_io_stack, enter_private_namespaces,
)

TEST_REGISTRIES = ("docker.io", "ghcr.io", "quay.io", "unmapped.io")


def pytest_configure(config: pytest.Config) -> None:
    try:
        enter_private_namespaces([*(f"{r}.{TEST_DOMAIN}" for r in TEST_REGISTRIES), REMOTE_CACHE_HOST])
    except OSError as e:
        pytest.exit(f"the e2e tests run in private namespaces: {e} (`scripts/test unit` needs no root)", returncode=4)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict:
    """Two images built offline: a small one with three layers, and one with a 100 MiB random layer."""
    workdir = tmp_path_factory.mktemp("images")
    small = build_image(workdir, "library/small", [
        ("etc/motd", b"hello from regcache's test image\n"),
        ("usr/share/doc/a.txt", b"a" * 5000),
        ("usr/share/doc/b.txt", os.urandom(70_000)),
    ])
    big = build_image(workdir, "library/big", [("big.bin", 100 << 20)])
    return {"small": small, "big": big}


@pytest.fixture(scope="session")
def upstream(tmp_path_factory, images) -> Upstream:
    """One upstream registry for the session, seeded with both images (as docker.io would be)."""
    registry = Upstream(tmp_path_factory.mktemp("upstream"), PORT_BASES["session"] + UPSTREAM_OFFSET).start()
    for image in images.values():
        registry.push(image)
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def module_upstream(tmp_path_factory, request) -> Upstream:
    """An upstream registry of the test module's own, on its PORT + UPSTREAM_OFFSET: its access
    log holds that module's requests only, and the module may stop it."""
    registry = Upstream(tmp_path_factory.mktemp("module-upstream"), request.module.PORT + UPSTREAM_OFFSET).start()
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def multiarch_image(tmp_path_factory, upstream) -> MultiArchImage:
    """library/multi:1.0 on the session upstream: an OCI index of a linux/amd64 and a linux/arm64 image."""
    image = build_multiarch_image(tmp_path_factory.mktemp("multiarch"), "library/multi", "1.0", ["amd64", "arm64"])
    upstream.push_multiarch(image)
    return image


@pytest.fixture(scope="session")
def stack(tmp_path_factory, upstream) -> Stack:
    """`regcache up` for the session: docker.io cached, ghcr.io passed through uncached."""
    stack = docker_io_stack(tmp_path_factory.mktemp("stack"), upstream, PORT_BASES["session"], {
        "REGCACHE_REGISTRIES": "DOCKERHUB,GHCR",
        "GHCR_UPSTREAM": upstream.url,
        "GHCR_CACHE": "none",
    }).start()
    yield stack
    assert stack.stop() == 0, "regcache up should exit 0 on SIGTERM"
