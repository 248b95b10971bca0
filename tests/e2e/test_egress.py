"""End to end, with the upstream's credentials in the proxy: client -> proxy -> cache -> egress -> upstream.

Three kinds of real `registry` upstream: anonymous, htpasswd Basic, and token auth (with the
token server from fakes.py, and blobs redirected to a CDN, as Docker Hub does). Each kind gets
its own upstream and `regcache up`, where docker.io is cached, ghcr.io passes through with the
right credentials and quay.io passes through with a wrong password. Tests of one kind run in
file order and build on each other (cold pull, then hits, then the upstream stops).
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.fakes import Cdn, TokenServer
from tests.support.parts import (
    PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, Stack, Upstream, cache_holds, docker_io_stack, htpasswd_auth, http_get,
    pull, raw_exchange, skopeo,
)

USER = "regcache-user"
PASSWORD = "pw-" + secrets.token_urlsafe(16)  # unique, so finding it anywhere is a leak
WRONG_PASSWORD = "wrong-" + secrets.token_urlsafe(16)
KINDS = ("anonymous", "basic", "token")
MANIFEST_OR_BLOB = ("manifest", "blob")


@dataclass
class World:
    kind: str
    upstream: Upstream
    stack: Stack
    tmp: Path
    token_server: TokenServer | None = None
    cdn: Cdn | None = None

    @property
    def cached(self) -> str:
        return f"docker.io.{TEST_DOMAIN}:{self.stack.port}"

    def host(self, registry: str) -> str:
        return f"{registry}.{TEST_DOMAIN}:{self.stack.port}"

    def secrets(self) -> list[str]:
        basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        issued = self.token_server.issued if self.token_server else []
        return [PASSWORD, WRONG_PASSWORD, basic, *issued]

    def stop_upstream(self) -> None:
        for part in (self.upstream, self.token_server, self.cdn):
            if part:
                part.stop()


@pytest.fixture(scope="module", params=KINDS)
def world(request, tmp_path_factory, images) -> World:
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    stack_port = PORT_BASES[f"test_egress[{kind}]"]
    upstream_port = stack_port + UPSTREAM_OFFSET
    token_server = cdn = None
    extra, creds = {}, None
    if kind == "basic":
        extra, creds = {"auth": htpasswd_auth(tmp / "auth", USER, PASSWORD)}, f"{USER}:{PASSWORD}"
    elif kind == "token":
        token_server = TokenServer(tmp / "auth", upstream_port + 1, {USER: PASSWORD}).start()
        cdn = Cdn(tmp / "upstream" / "storage", upstream_port + 2).start()
        extra = {"auth": token_server.registry_auth(), "middleware": cdn.registry_middleware()}
        creds = f"{USER}:{PASSWORD}"
    upstream = Upstream(tmp / "upstream", upstream_port, extra, creds).start()
    upstream.push(images["small"])
    if token_server:
        token_server.requests.clear()  # count only what regcache asks for
    credentials = {"USERNAME": USER, "PASSWORD": PASSWORD} if creds else {}
    settings = {
        "REGCACHE_REGISTRIES": "DOCKERHUB,GHCR,QUAY",
        "GHCR_CACHE": "none",
        "QUAY_CACHE": "none",
        "QUAY_USERNAME": USER,
        "QUAY_PASSWORD": WRONG_PASSWORD,
    }
    for key in ("GHCR", "QUAY"):
        settings[f"{key}_UPSTREAM"] = upstream.url
    for key in ("DOCKERHUB", "GHCR"):
        settings |= {f"{key}_{name}": value for name, value in credentials.items()}
    stack = docker_io_stack(tmp / "stack", upstream, stack_port, settings).start()
    world = World(kind, upstream, stack, tmp, token_server, cdn)
    yield world
    world.stack.stop()
    world.stop_upstream()


def pull_records(stack: Stack, before: int, image, registry: str = "docker.io") -> list[dict]:
    """The manifest and blob records of one pull of `image`, after the first `before` records."""
    return [r for r in stack.records_of_pull(image, before, registry) if r["kind"] in MANIFEST_OR_BLOB]


def test_cold_pull_goes_through_the_egress_and_is_a_miss(world, images):
    image = images["small"]
    assert pull(world.cached, image.reference, world.tmp / "cold") == image.manifest_digest
    records = pull_records(world.stack, 0, image)
    blobs = {r["reference"]: r["cache"] for r in records if r["kind"] == "blob" and r["method"] == "GET"}
    assert blobs == {digest: "miss" for digest in image.blob_digests}
    assert {r["cache"] for r in records if r["kind"] == "manifest" and r["method"] == "GET"} == {"miss"}
    if world.cdn:
        # Blobs came from the CDN, through regcache, and never with our Authorization header.
        fetched = {path.split("/")[-2] for method, path, _ in world.cdn.requests if method == "GET"}
        assert {d.split(":")[1] for d in image.blob_digests[1:]} <= fetched
        assert {authorization for *_, authorization in world.cdn.requests} == {None}


def test_cache_config_holds_no_secret(world):
    config = json.loads((world.stack.data_dir / "dockerhub" / "config.yml").read_text())
    assert config["proxy"] == {"remoteurl": f"http://127.0.0.1:{world.stack.port + 80}"}
    assert not any(s in json.dumps(config) for s in world.secrets())


def test_second_pull_is_a_hit(world, images):
    image = images["small"]
    before = len(world.stack.pull_records())
    assert pull(world.cached, image.reference, world.tmp / "warm") == image.manifest_digest
    records = pull_records(world.stack, before, image)
    assert records and {r["cache"] for r in records} == {"hit"}


def test_uncached_registry_gets_our_credentials(world, images):
    image = images["small"]
    before = len(world.stack.pull_records())
    assert pull(world.host("ghcr.io"), image.reference, world.tmp / "passthrough") == image.manifest_digest
    records = pull_records(world.stack, before, image, "ghcr.io")
    assert records and {r["cache"] for r in records} == {None}
    if world.cdn:
        # The client followed the CDN redirects through regcache: logged as ghcr.io's blobs, with their bytes.
        def downloaded(records):
            return {r["reference"] for r in records[before:]
                    if (r["registry"], r["kind"], r["status"]) == ("ghcr.io", "blob", 200) and r["bytes"] > 0}

        layers = set(image.blob_digests[1:])
        assert downloaded(world.stack.pull_records_until(lambda records: downloaded(records) >= layers)) >= layers


@pytest.mark.parametrize("world", ["basic"], indirect=True)
@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v2/", 401),  # answered by the proxy: the cache never sees the upstream's challenge, only ours
    ("PUT", "/v2/library/small/manifests/1.0", 405),
    ("GET", "/v2/_catalog", 404),
    ("GET", "/_regcache/redirect?url=http://127.0.0.1:22/&sig=00", 403),  # no open relay
])
def test_egress_serves_only_what_a_cache_needs(world, method, path, status):
    got, headers, body = http_get(f"http://127.0.0.1:{world.stack.port + 80}{path}", method=method)
    assert got == status
    if path == "/v2/":
        # A Basic challenge: registry:2 stops pinging before each tag lookup once it has one,
        # and, holding no credentials, still asks without any (the proxy adds ours).
        assert headers["WWW-Authenticate"] == 'Basic realm="regcache egress"'
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize("world", ["basic"], indirect=True)
def test_egress_refuses_anyone_but_the_cache(world, images):
    """Another host than the cache's (loopback) gets 403 and nothing goes upstream."""
    other_host = "192.0.2.10"  # an address of this test's own network namespace, not loopback
    subprocess.run(["ip", "address", "replace", f"{other_host}/32", "dev", "lo"], check=True)

    def upstream_fetches():
        return sum(v for (name, _), v in world.stack.metrics().items() if name == "regcache_upstream_fetches_total")

    before = upstream_fetches()
    request = f"GET /v2/{images['small'].name}/manifests/1.0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = raw_exchange(world.stack.port + 80, request.encode(), source=other_host)
    assert answer.startswith(b"HTTP/1.1 403") and b"DENIED" in answer
    assert upstream_fetches() == before


@pytest.mark.parametrize("world", ["basic", "token"], indirect=True)
def test_wrong_credentials_fail_fast_with_one_log_line(world, images):
    # Refused at once, not retried: within 20 s, or subprocess.TimeoutExpired fails the test.
    result = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{world.host('quay.io')}/{images['small'].reference}",
                    timeout=20)
    assert result.returncode != 0
    assert "401" in result.stderr or "unauthorized" in result.stderr.lower()
    refusals = [line for line in world.stack.output if "refused regcache" in line]
    assert len(refusals) == 1 and "quay.io" in refusals[0] and "QUAY_PASSWORD" in refusals[0]


@pytest.mark.parametrize("world", ["token"], indirect=True)
def test_one_token_request_per_scope_shared_by_pulls_and_restarts(world, images):
    image = images["small"]
    scope = f"repository:{image.name}:pull"
    for n in range(3):
        assert pull(world.cached, image.reference, world.tmp / f"reuse{n}") == image.manifest_digest
    world.stack.stop()
    world.stack.start()  # a fresh `regcache up` reads the token from its store
    assert pull(world.cached, image.reference, world.tmp / "after-restart") == image.manifest_digest
    # One for the cache's egress (docker.io), one for the pass-through registry (ghcr.io);
    # quay.io's wrong password was refused.
    assert world.token_server.granted_requests_for(scope) == 2
    tokens = world.stack.data_dir / "upstream-tokens"
    assert tokens.stat().st_mode & 0o777 == 0o700
    assert {f.stat().st_mode & 0o777 for f in tokens.iterdir()} == {0o600}


def test_cached_image_is_served_with_the_upstream_stopped_also_after_a_restart(world, images):
    image = images["small"]
    storage = world.stack.data_dir / "dockerhub" / "storage"
    assert all(cache_holds(storage, digest) for digest in image.blob_digests)
    world.stop_upstream()
    assert pull(world.cached, image.reference, world.tmp / "upstream-down") == image.manifest_digest
    world.stack.stop()
    world.stack.start()  # the cache starts although its upstream is down
    assert pull(world.cached, image.reference, world.tmp / "fresh-stack") == image.manifest_digest
    never_pulled = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{world.cached}/library/never:1.0")
    assert never_pulled.returncode != 0


def test_no_secret_in_anything_the_stack_wrote(world):
    """Every file under the data folder but the token store, the proxy's output and every
    process's argument list: none holds a password, a Basic header value or an issued token."""
    found = []
    for path in world.stack.data_dir.rglob("*"):
        if path.is_file() and "upstream-tokens" not in path.parts:
            text = path.read_bytes().decode(errors="replace")
            found += [(str(path), s[:8]) for s in world.secrets() if s in text]
    output = "\n".join(world.stack.output)
    found += [("regcache up output", s[:8]) for s in world.secrets() if s in output]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended
        found += [(str(cmdline), s[:8]) for s in world.secrets() if s in text]
    assert found == []
    if world.token_server:
        assert world.token_server.issued, "the search must include tokens"
