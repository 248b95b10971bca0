"""One client address opening 2,000 slow connections (slowloris: request heads trickled a byte
a second, never finished) while a normal client pulls: the proxy holds no more of them than
REGCACHE_MAX_CONNECTIONS_PER_CLIENT, closes the ones it admitted once their head is late, and
the normal client's pull goes through. The slow connections come from 127.0.0.2, the pull from
127.0.0.1, all on this namespace's loopback.

The proxy's closing is told from the client's giving up by the client's bounds, not by a time:
a slow connection trickles for a minute once open, twenty times the head deadline, so one that
ends before is one the proxy closed. The bounds count from the connection's opening: 2,000
connections at once wait in the proxy's accept backlog (their SYNs retried 1, 3, 7, 15 s later
while it is full) for as long as the machine's load makes the proxy take to accept them."""

from __future__ import annotations

import asyncio
import os
import resource
import threading
import time

import pytest

from tests.support.parts import PORT_BASES, TEST_DOMAIN, docker_io_stack, poll, pull

PORT = PORT_BASES["test_slow_clients"]
CAP = 100
HEAD_TIMEOUT = 3
SLOW_CONNECTIONS = 2000
CONNECT_WITHIN = 60.0  # seconds to open a slow connection, at most
SLOW_FOR = 60.0  # seconds a slow connection trickles at most once open
FD_LIMIT = 1024  # the proxy's, as is common: before the cap, 1,100 slow connections took every fd


@pytest.fixture(scope="module")
def limited_stack(tmp_path_factory, upstream):
    stack = docker_io_stack(tmp_path_factory.mktemp("slow-clients"), upstream, PORT, {
        "REGCACHE_MAX_CONNECTIONS_PER_CLIENT": str(CAP), "REGCACHE_HEAD_TIMEOUT": str(HEAD_TIMEOUT),
    }).start()
    yield stack
    assert stack.stop() == 0


async def slow_connection(ends: list[float]) -> None:
    """A request head sent a byte a second until the proxy closes the connection (its time open
    is added to `ends`) or SLOW_FOR passes."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", PORT, local_addr=("127.0.0.2", 0)),
                                                CONNECT_WITHIN)
    except (OSError, TimeoutError):
        return  # never open: missing from `ends`
    started = time.monotonic()
    try:
        writer.write(f"GET /v2/ HTTP/1.1\r\nHost: docker.io.{TEST_DOMAIN}:{PORT}\r\nX-Slow: ".encode())
        while time.monotonic() - started < SLOW_FOR:
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                    ends.append(time.monotonic() - started)  # the proxy closed it
                    return
            except TimeoutError:
                writer.write(b"a")
    except OSError:
        ends.append(time.monotonic() - started)
    finally:
        writer.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_slow_connections_from_one_address_neither_exhaust_the_proxy_nor_stall_a_pull(limited_stack, images, tmp_path):
    proxy = limited_stack.child("mitmdump")
    resource.prlimit(proxy, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    baseline = open_fds(proxy)
    ends: list[float] = []
    counts: list[int] = []

    async def slow_connections():
        await asyncio.wait_for(asyncio.gather(*(slow_connection(ends) for _ in range(SLOW_CONNECTIONS))),
                               CONNECT_WITHIN + SLOW_FOR + 20)

    attack = threading.Thread(target=asyncio.run, args=(slow_connections(),))
    attack.start()
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # the attack ramps up
            counts.append(open_fds(proxy))
            time.sleep(0.1)
        started = time.monotonic()
        pull(f"docker.io.{TEST_DOMAIN}:{PORT}", images["small"].reference, tmp_path / "pulled")
        pulled_in = time.monotonic() - started
        while attack.is_alive():
            counts.append(open_fds(proxy))
            attack.join(0.2)
    finally:
        attack.join(CONNECT_WITHIN + SLOW_FOR + 30)
    print(f"proxy fds: {baseline} before, {max(counts)} at most, {sorted(counts)[len(counts) // 2]} median;"
          f" pull took {pulled_in:.1f}s; slow connections open {max(ends, default=0):.1f}s at most")
    # Connections over the cap are accepted and closed at once: during the burst some wait for
    # that, then the proxy holds CAP of them until their heads are late.
    assert max(counts) < FD_LIMIT
    # Every connection was opened and closed by the proxy while its client still trickled:
    # refused at once, or its head late (a sweep each second closes those).
    assert len(ends) == SLOW_CONNECTIONS and max(ends) < SLOW_FOR
    assert poll(lambda: open_fds(proxy), lambda count: count < baseline + 10, timeout=60) < baseline + 10
