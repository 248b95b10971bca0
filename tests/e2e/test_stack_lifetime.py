"""`regcache up` ends with everything it started, however it ends: SIGKILLed (the OOM killer,
`kill -9`), SIGTERMed (the drain), or when its proxy dies by itself. Nothing is left holding a
port or serving unsupervised, and the next `regcache up` on the same ports and data directory
serves. A second `regcache up` on a data directory whose stack still runs names its processes.
The pid file and children dying with their parent, without a stack: tests/unit/test_stack_lifetime.py."""

from __future__ import annotations

import http.client
import os
import signal
from urllib.parse import urlsplit

import pytest

from tests.support.parts import (
    PORT_BASES, REGISTRY_PROGRAM, TEST_DOMAIN, accepts_connections, child_pids, docker_io_stack, has_exited, poll, pull,
)
from regcache_core.stack.pid_file import FILE_NAME

PORT = PORT_BASES["test_stack_lifetime"]
DOCKER_IO = f"docker.io.{TEST_DOMAIN}:{PORT}"
# The client port, the cache, the data plane, the admin endpoint, the egress listener.
STACK_PORTS = (PORT, PORT + 1, PORT + 50, PORT + 70, PORT + 80)
GRACE = 3  # REGCACHE_STOP_GRACE: a stalled pull in flight holds the SIGTERM drain this long


def descendants(pid: int) -> list[int]:
    children = child_pids(pid)
    return children + [grandchild for child in children for grandchild in descendants(child)]


def stalled_download(image) -> http.client.HTTPResponse:
    """A pull in flight: the image's last layer (cold, so the proxy downloads it and the client
    follows the 307 to the download's spool on the data plane), of which the client read 1 MiB
    and stopped."""
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    connection.request("GET", f"/v2/{image.name}/blobs/{image.blob_digests[-1]}", headers={"Host": DOCKER_IO})
    redirect = connection.getresponse()
    redirect.read()
    assert redirect.status == 307, "a cold layer follows its download on the data plane"
    location = urlsplit(redirect.headers["Location"])
    connection = http.client.HTTPConnection(location.hostname, location.port, timeout=60)
    connection.request("GET", f"{location.path}?{location.query}")
    response = connection.getresponse()
    assert response.status == 200
    response.read(1 << 20)
    return response


ENDINGS = {
    "SIGKILL": (lambda stack: stack.process.kill(), -signal.SIGKILL),
    "SIGTERM": (lambda stack: stack.process.terminate(), 0),
    "the proxy dies": (lambda stack: os.kill(stack.child("mitmdump"), signal.SIGKILL), 1),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_regcache_up_leaves_nothing_running_however_it_ends_and_the_next_one_serves(
        tmp_path, upstream, images, ending):
    end, status = ENDINGS[ending]
    settings = {"REGCACHE_STOP_GRACE": str(GRACE)}
    first = docker_io_stack(tmp_path, upstream, PORT, settings).start()
    try:
        # regcache up, the proxy and its download worker, the data plane's parent and each of
        # its workers, the cache (the download worker starts as the proxy loads its settings).
        stack = poll(lambda: [first.process.pid, *descendants(first.process.pid)],
                     lambda pids: len(pids) == 5 + os.cpu_count(), timeout=10)
        assert len(stack) == 5 + os.cpu_count(), stack
        in_flight = stalled_download(images["big"])
        try:
            end(first)
            assert first.process.wait(GRACE + 30) == status
            left = poll(lambda: [pid for pid in stack if not has_exited(pid)], lambda left: not left, timeout=2)
            assert left == [], f"still running after regcache up ended ({ending})"
            assert not any(map(accepts_connections, STACK_PORTS))
        finally:
            in_flight.close()
    finally:
        first.stop()

    again = docker_io_stack(tmp_path, upstream, PORT, settings).start()
    try:
        image = images["small"]
        assert pull(DOCKER_IO, image.reference, tmp_path / "pulled") == image.manifest_digest
    finally:
        assert again.stop() == 0
    assert not (again.data_dir / FILE_NAME).exists()


def test_a_second_regcache_up_on_the_same_data_directory_names_the_running_stack_in_one_line(tmp_path, upstream):
    first = docker_io_stack(tmp_path, upstream, PORT).start()
    try:
        second = first.command("up")
        assert second.returncode == 1 and second.stdout == ""
        [line] = second.stderr.splitlines()
        assert line.startswith(f"regcache: a stack of an earlier run still runs on {first.data_dir}: "
                               f"pids {first.process.pid} (regcache up), {first.child('mitmdump')} (proxy (mitmdump)), ")
        assert all(f" {pid} (" in line for pid in child_pids(first.process.pid))
        assert f" {first.child(REGISTRY_PROGRAM)} (cache for docker.io)" in line
        assert line.endswith("; stop it first, or set REGCACHE_DATA_DIR to another directory")
        assert first.admin("/ready")[0] == 200, "the running stack is left alone"
    finally:
        assert first.stop() == 0
