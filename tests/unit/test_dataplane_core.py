"""The data plane's plain parts, without servers: grants, the shared key, registry:2's storage
layout, which blob GETs the proxy hands off (to which URL), and the records' way to the proxy."""

from __future__ import annotations

import asyncio
import multiprocessing
import stat
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from regcache_core.config import DEFAULTS, parse_config
from regcache_core.dataplane.grants import GRANT_LIFETIME, Grant, GrantSigner, grant_key, load_or_create_key
from regcache_core.dataplane.handoff import COLD, SmallBlob, client_base_url, warm_blob_answer
from regcache_core.dataplane.records import RecordSender, receive_records
from regcache_core.dataplane.storage import warm_blob
from regcache_core.observe.pull_log import from_json, pull_record, to_json
from regcache_core.routing import route

DIGEST = "sha256:" + "ab" * 32
KEY = b"k" * 32


def test_a_grant_verifies_until_it_expires():
    now = [1_000_000.0]
    signer = GrantSigner(KEY, clock=lambda: now[0])
    grant = signer.grant("blob", "docker.io", "library/big", DIGEST, 123)
    assert grant == Grant("blob", "docker.io", "library/big", DIGEST, 123, 1_000_000 + GRANT_LIFETIME)
    query = signer.query(grant)
    assert signer.verify(query, "blob") == grant
    assert signer.verify(query, "spool") is None  # a grant of one kind opens no other path
    assert GrantSigner(b"x" * 32, clock=lambda: now[0]).verify(query, "blob") is None
    for field, value in (("registry=docker.io", "registry=ghcr.io"), ("size=123", "size=124"),
                         ("library%2Fbig", "library%2Fsmall"), ("sig=", "sig=0")):
        assert signer.verify(query.replace(field, value), "blob") is None, field
    now[0] += GRANT_LIFETIME + 1
    assert signer.verify(query, "blob") is None


def test_a_grant_with_non_ascii_garbage_is_refused():
    assert GrantSigner(KEY).verify("kind=blob&sig=%C3%A9", "blob") is None


def test_the_key_is_made_once_and_kept_private(tmp_path):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        keys = pool.map(load_or_create_key, [tmp_path] * 8)
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert load_or_create_key(tmp_path) == keys[0]
    assert stat.S_IMODE((tmp_path / "dataplane.key").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["dataplane.key"]  # no drafts left


def test_replicas_sign_with_a_key_from_their_shared_secret_one_node_with_its_own(tmp_path):
    def config(data_dir: Path, **changes: str):
        return parse_config({**DEFAULTS, "REGCACHE_DATA_DIR": str(data_dir), **changes})

    replica = {"REGCACHE_REDIS_URL": "redis://redis", "REGCACHE_CLUSTER_SECRET": "s" * 32}
    a = grant_key(config(tmp_path / "a", REGCACHE_DATAPLANE_URL="http://10.0.0.1:5050", **replica))
    b = grant_key(config(tmp_path / "b", REGCACHE_DATAPLANE_URL="http://10.0.0.2:5050", **replica))
    assert a == b and len(a) == 32 and b"s" * 16 not in a
    # So a grant one replica signed opens the other's data plane.
    grant = GrantSigner(a).grant("spool", "docker.io", "library/big", DIGEST, 5)
    assert GrantSigner(b).verify(GrantSigner(a).query(grant), "spool") == grant
    other = grant_key(config(tmp_path / "c", REGCACHE_DATAPLANE_URL="http://10.0.0.3:5050",
                             REGCACHE_REDIS_URL="redis://redis", REGCACHE_CLUSTER_SECRET="t" * 32))
    assert GrantSigner(other).verify(GrantSigner(a).query(grant), "spool") is None
    assert grant_key(config(tmp_path / "d")) == load_or_create_key(tmp_path / "d") != a
    assert not (tmp_path / "a" / "dataplane.key").exists()


def store(root: Path, repository: str, digest: str, data: bytes, link: str | None = None) -> Path:
    """A blob as registry:2 stores it, linked in `repository` (with `link`'s text, if given)."""
    algorithm, _, hex_digits = digest.partition(":")
    v2 = root / "docker/registry/v2"
    blob = v2 / "blobs" / algorithm / hex_digits[:2] / hex_digits / "data"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    layer = v2 / "repositories" / repository / "_layers" / algorithm / hex_digits / "link"
    layer.parent.mkdir(parents=True)
    layer.write_text(link or digest)
    return blob


def test_warm_blob_follows_registry_layout(tmp_path):
    blob = store(tmp_path, "library/big", DIGEST, b"bytes")
    assert warm_blob(tmp_path, "library/big", DIGEST) == blob
    assert warm_blob(tmp_path, "library/small", DIGEST) is None  # not linked there
    assert warm_blob(tmp_path, "library/big", "sha256:" + "cd" * 32) is None
    assert warm_blob(tmp_path, "library/../library/big", DIGEST) is None
    other = "sha256:" + "ef" * 32
    store(tmp_path, "library/odd", other, b"x", link=DIGEST)  # a link naming another blob
    assert warm_blob(tmp_path, "library/odd", other) is None
    blob.unlink()
    assert warm_blob(tmp_path, "library/big", DIGEST) is None


@pytest.mark.parametrize("host, base", [
    ("docker.io.registry.example:5000", "http://docker.io.registry.example:5050"),
    ("Docker.IO.registry.example.", "http://Docker.IO.registry.example.:5050"),
    ("10.0.0.5:5000", "http://10.0.0.5:5050"),
    ("[fd00::5]:5000", "http://[fd00::5]:5050"),
    ("[::1]", "http://[::1]:5050"),
    ("evil.example/x", None),
    ("user@host:5000", None),
    ("[nonsense]:5000", None),
    ("", None),
])
def test_the_data_plane_is_on_the_host_the_client_named(host, base):
    assert client_base_url(host, 5050) == base


def target_of(config, repository="library/big"):
    return route(config, "GET", "docker.io.registry.localhost:5000", f"/v2/{repository}/blobs/{DIGEST}")


@pytest.mark.parametrize("changes, size, answer", [
    ({}, 2 << 20, "redirect"),
    ({}, 256 << 10, "redirect"),  # exactly REGCACHE_DATAPLANE_MIN_SIZE
    ({}, (256 << 10) - 1, "bytes"),
    ({"REGCACHE_DATAPLANE_MIN_SIZE": "0"}, 1, "redirect"),
    ({"REGCACHE_DATAPLANE": "false"}, 2 << 20, None),
    ({"REGCACHE_DATAPLANE": "false"}, 1, None),
])
def test_how_warm_blobs_are_answered(tmp_path, changes, size, answer):
    config = parse_config({**DEFAULTS, "REGCACHE_DATA_DIR": str(tmp_path), **changes})
    store(config.registries[0].storage, "library/big", DIGEST, b"x" * size)
    got = warm_blob_answer(config, GrantSigner(KEY), target_of(config), "docker.io.registry.localhost:5000", False)
    assert {str: "redirect", SmallBlob: "bytes", type(None): None}[type(got)] == answer
    if answer == "redirect":
        grant = GrantSigner(KEY).verify(urlsplit(got).query, "blob")
        assert (grant.registry, grant.repository, grant.digest, grant.size) == ("docker.io", "library/big", DIGEST, size)
    if answer == "bytes":
        assert got.body == b"x" * size
        assert (got.headers["Docker-Content-Digest"], got.headers["ETag"]) == (DIGEST, f'"{DIGEST}"')
        # Range and conditional requests go to the cache, which answers them.
        assert warm_blob_answer(config, GrantSigner(KEY), target_of(config), "h:5000", True) is None
    # Not linked in that repository: cold there (with the data plane on).
    cold = warm_blob_answer(config, GrantSigner(KEY), target_of(config, "library/small"), "h:5000", False)
    assert cold is (COLD if answer else None)


def test_a_public_url_replaces_the_client_host(tmp_path):
    config = parse_config({**DEFAULTS, "REGCACHE_DATA_DIR": str(tmp_path),
                           "REGCACHE_DATAPLANE_URL": "https://regcache.example.com:30050"})
    store(config.registries[0].storage, "library/big", DIGEST, b"x" * (2 << 20))
    location = warm_blob_answer(config, GrantSigner(KEY), target_of(config), "10.0.0.5:5000", False)
    assert location.startswith("https://regcache.example.com:30050/_regcache/blob?")


def test_records_the_proxy_does_not_take_are_dropped_with_a_warning_a_minute(tmp_path, caplog):
    now = [0.0]
    sender = RecordSender(tmp_path / "nobody-listens.sock", clock=lambda: now[0])
    record = pull_record(started=0, finished=1, client="10.0.0.1", registry=None, repository=None, kind=None,
                         reference=None, method="GET", status=403, sent=0, backend=None)

    async def send(count: int) -> None:
        task = asyncio.create_task(sender.run())
        for _ in range(count):
            sender(record)
        await sender.flush(5)
        task.cancel()

    asyncio.run(send(3))
    now[0] = 61
    asyncio.run(send(2))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and warnings[0].startswith("1 pull record(s) dropped") and warnings[1].startswith("3 pull")
    assert str(tmp_path / "nobody-listens.sock") in warnings[0]


def test_records_reach_the_receiver_in_order(tmp_path):
    received = []

    async def exchange() -> None:
        transport = await receive_records(tmp_path / "records.sock", received.append)
        sender = RecordSender(tmp_path / "records.sock")
        task = asyncio.create_task(sender.run())
        for status in range(200, 250):  # more than the kernel queues for an unconnected socket (often 10)
            sender(pull_record(started=0, finished=0.5, client="::1", registry="docker.io", repository="library/big",
                               kind="blob", reference=DIGEST, method="GET", status=status, sent=status, backend="dataplane",
                               cache="hit"))
        await sender.flush(5)
        await asyncio.sleep(0.1)
        task.cancel()
        transport.close()

    asyncio.run(exchange())
    assert [r.status for r in received] == list(range(200, 250))
    assert received[0].duration_ms == 500 and received[0].backend == "dataplane"
    assert stat.S_IMODE((tmp_path / "records.sock").stat().st_mode) == 0o600


def test_a_datagram_that_is_no_record_is_ignored():
    assert from_json(b"garbage") is None
    assert from_json(b'{"status": 200}') is None
    good = pull_record(started=0, finished=0, client="", registry=None, repository=None, kind=None, reference=None,
                       method="GET", status=404, sent=0, backend=None)
    assert from_json(to_json(good)) == good
    assert from_json(to_json(good).replace('"status":404', '"status":"404"')) is None
    assert from_json(to_json(good).replace('"bytes":0', '"bytes":true')) is None


def test_a_workers_notice_that_the_store_is_down_reaches_the_proxy_once_a_second_at_most(tmp_path):
    received, notices = [], []
    now = [0.0]

    async def exchange() -> None:
        transport = await receive_records(tmp_path / "records.sock", received.append, notices.append)
        sender = RecordSender(tmp_path / "records.sock", clock=lambda: now[0])
        task = asyncio.create_task(sender.run())
        sender.store_down("timed out")
        sender.store_down("timed out again")  # within the second: not sent
        now[0] = 1.5
        sender.store_down("503 ServiceUnavailable")
        await sender.flush(5)
        await asyncio.sleep(0.1)
        task.cancel()
        transport.close()

    asyncio.run(exchange())
    assert notices == ["timed out", "503 ServiceUnavailable"] and received == []
