"""Test session set-up: a private network and mount namespace, a shared upstream, seeded images.

The whole pytest process moves into new namespaces before any test runs, so every server it
starts listens on a loopback of its own (no port can collide with anything on the machine),
and /etc/hosts is ours to point test names at 127.0.0.1. This needs root, as CI has.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from parts import TEST_DOMAIN, Upstream, build_image

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
TEST_REGISTRIES = ("docker.io", "ghcr.io", "quay.io", "unmapped.io")
UPSTREAM_PORT = 6000


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        pytest.exit("the tests need root: they run in private network and mount namespaces (unshare)", returncode=4)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS | CLONE_NEWNET) != 0:
        pytest.exit(f"unshare failed: {os.strerror(ctypes.get_errno())}", returncode=4)
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    hosts = Path(tempfile.mkdtemp(prefix="regcache-hosts-")) / "hosts"
    names = " ".join(f"{r}.{TEST_DOMAIN}" for r in TEST_REGISTRIES)
    hosts.write_text(f"127.0.0.1 localhost {names}\n::1 localhost\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    for proxy_variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(proxy_variable, None)


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
    registry = Upstream(tmp_path_factory.mktemp("upstream"), UPSTREAM_PORT).start()
    for image in images.values():
        registry.push(image)
    yield registry
    registry.stop()
