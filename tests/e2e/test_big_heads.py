"""Request heads past REGCACHE_MAX_REQUEST_HEAD (64 KiB by default), sent with raw sockets to a
real `regcache up`: a head that never ends and a 1 MiB one sent in one go get `431` with a
registry-format JSON body and the connection closed, on the client and the egress listener; the
proxy's memory stays within a few MiB while clients keep sending them, and a pull on other
connections completes meanwhile; a head just under the bound is served as any other."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import pytest

from tests.support.parts import PORT_BASES, TEST_DOMAIN, docker_io_stack, memory_mib, poll, pull

PORT = PORT_BASES["test_big_heads"]
EGRESS_PORT = PORT + 80  # the docker.io cache's upstream listener (Stack's REGCACHE_EGRESS_PORT)
HUB = f"docker.io.{TEST_DOMAIN}:{PORT}"
BOUND = 64 << 10
HEAD_START = f"GET /v2/ HTTP/1.1\r\nHost: {HUB}\r\nX-Padding: ".encode()
ENDLESS_FOR = 256 << 20  # bytes an endless head sends at most before it gives up on an answer
RSS_GROWTH_MIB = 16
HEAD_TIMEOUT = 3  # seconds; a client that goes on sending after its 431 is closed then


@pytest.fixture(scope="module")
def bounded_stack(tmp_path_factory, upstream):
    stack = docker_io_stack(tmp_path_factory.mktemp("big-heads"), upstream, PORT,
                            {"REGCACHE_HEAD_TIMEOUT": str(HEAD_TIMEOUT)}).start()
    yield stack
    assert stack.stop() == 0


def answer_of(conn: socket.socket) -> bytes:
    """What the server sends until it closes (a reset after its answer counts as a close)."""
    received = bytearray()
    try:
        while chunk := conn.recv(1 << 16):
            received += chunk
    except ConnectionResetError:
        pass
    return bytes(received)


def endless_head(port: int) -> bytes:
    """A request head that never ends, sent as fast as the proxy reads it until the proxy
    answers and closes (or ENDLESS_FOR bytes have gone); returns the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        stop = threading.Event()

        def send() -> None:
            sent = 0
            try:
                conn.sendall(HEAD_START)
                while sent < ENDLESS_FOR and not stop.is_set():
                    sent += conn.send(b"a" * (1 << 16))
            except OSError:
                pass  # the proxy closed the connection

        sender = threading.Thread(target=send)
        sender.start()
        try:
            return answer_of(conn)
        finally:
            stop.set()
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a sender blocked on a full buffer
            except OSError:
                pass  # reset already
            sender.join(30)


def one_go(port: int, head: bytes, wrap=lambda conn: conn) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, wrap(raw) as conn:
        conn.sendall(head)
        return answer_of(conn)


def assert_refused(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert lines[0] == "HTTP/1.1 431 Request Header Fields Too Large", answer[:300]
    assert headers["connection"] == "close" and int(headers["content-length"]) == len(body)
    assert json.loads(body)["errors"][0]["message"] == f"the request head is larger than {BOUND} bytes"


def head_of(size: int) -> bytes:
    """A whole request head of exactly `size` bytes."""
    end = b"\r\nConnection: close\r\n\r\n"
    return HEAD_START + b"a" * (size - len(HEAD_START) - len(end)) + end


def test_endless_heads_get_431_while_memory_stays_flat_and_a_pull_goes_through(bounded_stack, images, tmp_path):
    proxy = bounded_stack.child("mitmdump")
    refused_before = bounded_stack.metrics().get(("regcache_client_refusals_total", (("reason", "head_too_large"),)), 0)
    before = memory_mib(proxy)
    samples: list[float] = []
    answers: list[bytes] = []
    pulled = threading.Event()

    def attack() -> None:  # four clients sending endless heads, each again once refused, until the pull is done
        def client() -> None:
            while not pulled.is_set() or not answers:
                answers.append(endless_head(PORT))
        clients = [threading.Thread(target=client) for _ in range(4)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(120)

    def sample() -> None:
        while not pulled.is_set() or attacker.is_alive():
            samples.append(memory_mib(proxy)["VmRSS"])
            time.sleep(0.02)

    attacker, sampler = threading.Thread(target=attack), threading.Thread(target=sample)
    attacker.start()
    sampler.start()
    try:
        digest = pull(HUB, images["small"].reference, tmp_path / "pulled")
    finally:
        pulled.set()
        attacker.join(120)
        sampler.join(10)
    after = memory_mib(proxy)
    growth = max(samples) - before["VmRSS"]
    print(f"proxy RSS {before['VmRSS']:.1f} MiB before, {max(samples):.1f} at most during {len(answers)} endless"
          f" heads, {after['VmRSS']:.1f} after (peak ever {after['VmHWM']:.1f}); growth {growth:.1f} MiB")
    assert digest == images["small"].manifest_digest
    for answer in answers:
        assert_refused(answer)
    assert growth < RSS_GROWTH_MIB
    refused = poll(lambda: bounded_stack.metrics().get(
        ("regcache_client_refusals_total", (("reason", "head_too_large"),)), 0), lambda n: n >= refused_before + len(answers))
    assert refused == refused_before + len(answers)
    assert [line for line in bounded_stack.output if "a request head larger than 65536 bytes" in line]


def test_a_client_sending_on_after_its_431_is_closed_by_its_head_deadline(bounded_stack):
    """After the 431 the proxy reads and drops what comes (a close with unread bytes would reset
    the connection before the client read its answer), but not for longer than the head deadline."""
    with socket.create_connection(("127.0.0.1", PORT), timeout=30) as conn:
        conn.sendall(HEAD_START)
        deadline = time.monotonic() + HEAD_TIMEOUT + 30
        with pytest.raises(OSError):  # the proxy closed it: a reset, as this client never reads
            while time.monotonic() < deadline:
                conn.sendall(b"a" * (1 << 16))


@pytest.mark.parametrize("port", [PORT, EGRESS_PORT], ids=["client", "egress"])
def test_a_1_mib_head_in_one_go_gets_431(bounded_stack, port):
    assert_refused(one_go(port, head_of(1 << 20)))


def test_a_head_just_under_the_bound_is_served(bounded_stack):
    answer = one_go(PORT, head_of(BOUND))
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"errors"' not in answer, answer[:300]
    assert_refused(one_go(PORT, head_of(BOUND + 1)))


def test_a_1_mib_head_over_tls_gets_431(bounded_stack):
    """A client may speak TLS to the plain listener (mitmproxy answers it with a certificate of
    its own); its HTTP/1 heads are bounded the same."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    assert_refused(one_go(PORT, head_of(1 << 20), lambda raw: context.wrap_socket(raw, server_hostname=HUB.split(":")[0])))
