"""`regcache up` looks after its children: a cache that dies is started again, and SIGTERM lets
a pull in flight finish within REGCACHE_STOP_GRACE before the stack stops."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import time
from urllib.parse import urlsplit

import pytest

from tests.support.parts import (
    PORT_BASES, REGISTRY_PROGRAM, TEST_DOMAIN, accepts_connections, docker_io_stack, poll, pull,
)

PORT = PORT_BASES["test_supervision"]
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"
GRACE = 20


@pytest.fixture(scope="module")
def supervised_stack(tmp_path_factory, upstream):
    stack = docker_io_stack(tmp_path_factory.mktemp("supervised"), upstream, PORT,
                            {"REGCACHE_STOP_GRACE": str(GRACE)}).start()
    yield stack
    stack.stop()


def test_a_killed_cache_is_started_again_and_the_stack_stays_up(supervised_stack, images, tmp_path):
    image = images["small"]
    cache = supervised_stack.child(REGISTRY_PROGRAM)
    os.kill(cache, signal.SIGKILL)
    assert poll(lambda: any("started again" in line for line in supervised_stack.output), bool, timeout=20)
    assert any("exited with status -9; starting it again in 1s" in line for line in supervised_stack.output)
    assert supervised_stack.process.poll() is None, "regcache up still runs"
    assert poll(lambda: supervised_stack.admin("/ready")[0], lambda status: status == 200, timeout=20) == 200
    assert pull(DOCKER_IO, image.reference, tmp_path / "pulled") == image.manifest_digest
    assert supervised_stack.child(REGISTRY_PROGRAM) != cache


def test_sigterm_lets_a_pull_in_flight_finish(supervised_stack, images):
    """A slow client is reading a cold layer (from the data plane, as the proxy downloads it)
    when the stack gets SIGTERM: no new connection is taken, the download goes on, the layer
    arrives whole, and then the stack exits 0, well within the grace period."""
    big = images["big"]
    layer = big.blob_digests[-1]
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    connection.request("GET", f"/v2/{big.name}/blobs/{layer}", headers={"Host": DOCKER_IO})
    redirect = connection.getresponse()
    redirect.read()
    assert redirect.status == 307
    location = urlsplit(redirect.getheader("Location"))
    connection = http.client.HTTPConnection("127.0.0.1", location.port, timeout=60)
    connection.request("GET", f"{location.path}?{location.query}", headers={"Host": location.netloc})
    response = connection.getresponse()
    assert response.status == 200
    digest = hashlib.sha256(response.read(1 << 20))
    signalled = time.monotonic()
    supervised_stack.process.send_signal(signal.SIGTERM)
    try:
        assert poll(lambda: accepts_connections(PORT), lambda accepts: not accepts, timeout=10) is False
        time.sleep(1)  # the slow client keeps reading well past the proxy's quiet spell
        assert supervised_stack.process.poll() is None
        while chunk := response.read(1 << 20):
            digest.update(chunk)
    finally:
        connection.close()
    assert f"sha256:{digest.hexdigest()}" == layer
    assert supervised_stack.process.wait(GRACE + 15) == 0
    assert time.monotonic() - signalled < GRACE
