"""The data plane's spool routes on raw sockets: a follower gets the spool as it grows, the last
bytes once the spool is sealed, and a spool that can never be whole is cut, never ended as a
short body (dataplane/spool_reader.py).

The session stack's data plane serves spool files of its data dir; these tests make the files
themselves (as the proxy's download would: written, then sealed read-only once their bytes
checked) and sign grants with the data dir's key.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time

import pytest

from tests.support.parts import PORT_BASES, Stack, raw_exchange
from regcache_core.dataplane.grants import GRANT_PATHS, GrantSigner, load_or_create_key
from regcache_core.spool.table import HOLD_BACK, SPOOL_DIR, spool_path

DATAPLANE_PORT = PORT_BASES["session"] + 50
BLOB = os.urandom(3 << 20)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
REPOSITORY = "library/spooled"


@pytest.fixture
def spool(stack: Stack):
    """A spool file of BLOB in the stack's data dir (empty to start with), and its grant's query."""
    path = spool_path(stack.data_dir / SPOOL_DIR, ("docker.io", REPOSITORY, DIGEST))
    path.write_bytes(b"")
    os.chmod(path, 0o600)
    yield path, grant_query(stack, "spool")
    path.unlink(missing_ok=True)


def grant_query(stack: Stack, kind: str, cache: str = "hit") -> str:
    signer = GrantSigner(load_or_create_key(stack.data_dir))
    return signer.query(signer.grant(kind, "docker.io", REPOSITORY, DIGEST, len(BLOB), cache))


def seal(path) -> None:
    os.chmod(path, 0o400)


def request(query: str, method: str = "GET", close: bool = False, kind: str = "spool") -> bytes:
    """The request head; `close` asks the server to close the connection after its answer."""
    connection = "Connection: close\r\n" if close else ""
    return f"{method} {GRANT_PATHS[kind]}?{query} HTTP/1.1\r\nHost: 127.0.0.1:{DATAPLANE_PORT}\r\n{connection}\r\n".encode()


def split(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}, body


def test_a_follower_streams_the_spool_while_it_grows(spool):
    path, query = spool
    with open(path, "ab", buffering=0) as f, socket.create_connection(("127.0.0.1", DATAPLANE_PORT), timeout=10) as conn:
        f.write(BLOB[:1 << 20])
        conn.sendall(request(query))
        received = b""
        while len(received) < (1 << 20):  # the first MiB arrives before the rest is written
            received += conn.recv(65536)
        f.write(BLOB[1 << 20:])
        seal(path)
        while len(split(received)[2]) < len(BLOB) and (chunk := conn.recv(65536)):
            received += chunk
    status, headers, body = split(received)
    assert status == "HTTP/1.1 200 OK"
    assert (headers["content-length"], headers["docker-content-digest"]) == (str(len(BLOB)), DIGEST)
    assert body == BLOB


def test_head_has_the_blob_headers_and_no_body(spool):
    path, query = spool
    status, headers, body = split(raw_exchange(DATAPLANE_PORT, request(query, "HEAD", close=True)))
    assert (status, headers["content-length"], body) == ("HTTP/1.1 200 OK", str(len(BLOB)), b"")


def test_a_download_failing_midway_cuts_the_connection_short_of_its_content_length(spool):
    path, query = spool
    path.write_bytes(BLOB[:1 << 20])
    with socket.create_connection(("127.0.0.1", DATAPLANE_PORT), timeout=10) as conn:
        conn.sendall(request(query))
        time.sleep(0.3)
        path.unlink()  # what the proxy does when its download fails
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    status, headers, body = split(received)
    assert status == "HTTP/1.1 200 OK" and headers["content-length"] == str(len(BLOB))
    assert len(body) == 1 << 20, "the connection ends where the spool ended, short of Content-Length"


def test_the_last_bytes_wait_for_the_seal_and_never_go_when_the_bytes_hash_wrong(spool):
    path, query = spool
    path.write_bytes(BLOB[:-1] + bytes([BLOB[-1] ^ 1]))
    with socket.create_connection(("127.0.0.1", DATAPLANE_PORT), timeout=10) as conn:
        conn.sendall(request(query))
        received = b""
        while len(split(received)[2]) < len(BLOB) - HOLD_BACK:
            received += conn.recv(65536)
        time.sleep(0.3)
        path.unlink()  # what the proxy does when the bytes hash wrong: no seal
        while chunk := conn.recv(65536):
            received += chunk
    assert len(split(received)[2]) == len(BLOB) - HOLD_BACK, "the last bytes are held back until the seal"


def test_a_clients_cold_transfer_leaves_a_pull_record_marked_as_its_grant_says(spool, stack):
    path, _ = spool
    path.write_bytes(BLOB)
    seal(path)
    before = len(stack.pull_records())
    status, headers, body = split(raw_exchange(DATAPLANE_PORT, request(grant_query(stack, "cold", "miss"), close=True,
                                                                        kind="cold")))
    assert (status, body) == ("HTTP/1.1 200 OK", BLOB)
    [record] = stack.records_after(before)
    assert (record["backend"], record["cache"], record["bytes"], record["kind"]) == ("dataplane", "miss", len(BLOB), "blob")


@pytest.mark.parametrize("change", ["unsigned", "altered", "blob grant"])
def test_a_query_that_is_no_spool_grant_of_ours_gets_403(spool, stack, change):
    path, query = spool
    if change == "unsigned":
        query = query.partition("&sig=")[0]
    elif change == "altered":
        query = query.replace("size=", "size=1")
    else:
        query = grant_query(stack, "blob")
    status, headers, body = split(raw_exchange(DATAPLANE_PORT, request(query, close=True)))
    assert status.startswith("HTTP/1.1 403")
    assert json.loads(body)["errors"][0]["code"] == "DENIED"


def test_a_spool_that_is_gone_gets_404(spool):
    path, query = spool
    path.unlink()
    status, _, body = split(raw_exchange(DATAPLANE_PORT, request(query, close=True)))
    assert status.startswith("HTTP/1.1 404")
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
