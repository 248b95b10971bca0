"""mitmweb through `regcache up --web`, end to end: the login it prints, labelled and bounded
rows, no credentials while an upstream hangs, a manifest served stale, flows saved (Save menu,
save_stream_file, HAR) with their labels and without upstream credentials, a quiet Ctrl-C. The
flow view's parts, with mitmproxy's own View addon, are in tests/unit/test_web.py."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mitmproxy import io

from regcache_core.observe.stats import human_bytes
from regcache_core.stack.launcher import mitmweb_has_password
from tests.support.parts import (
    MANIFEST_TYPES, PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, Stack, Upstream, cache_holds, child_pids, command_line,
    docker_io_stack, htpasswd_auth, http_get, poll, pull, skopeo,
)


PORT = PORT_BASES["test_web"]


WEB_UI = "http://127.0.0.1:8081"


USER, PASSWORD = "puller", "web-secret-pw"


GHCR = f"ghcr.io.{TEST_DOMAIN}:{PORT}"


TTL = 1.0  # seconds a tag is fresh: quay.io's goes stale soon after its upstream stops


@pytest.fixture(scope="module")
def private_upstream(tmp_path_factory, images) -> Upstream:
    """ghcr.io's upstream, asking for Basic credentials: regcache adds them to each request."""
    root = tmp_path_factory.mktemp("private-upstream")
    registry = Upstream(root, PORT + UPSTREAM_OFFSET, {"auth": htpasswd_auth(root / "auth", USER, PASSWORD)},
                        f"{USER}:{PASSWORD}").start()
    registry.push(images["small"])
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def quay_upstream(tmp_path_factory, images) -> Upstream:
    """quay.io's upstream, of this module's own: a test stops it, for an answer served stale."""
    registry = Upstream(tmp_path_factory.mktemp("quay-upstream"), PORT + UPSTREAM_OFFSET + 1).start()
    registry.push(images["small"])
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Where the stack's mitmweb saves every flow (save_stream_file) and writes a HAR file as it
    stops (hardump): set in mitmproxy's own options file, as a user would, in the HOME it gets."""
    home = tmp_path_factory.mktemp("web-home")
    (home / ".mitmproxy").mkdir()
    (home / ".mitmproxy" / "config.yaml").write_text(f"save_stream_file: {home / 'flows'}\nhardump: {home / 'flows.har'}\n")
    return home


@pytest.fixture(scope="module")
def web_stack(tmp_path_factory, upstream, private_upstream, quay_upstream, saved) -> Stack:
    stack = docker_io_stack(tmp_path_factory.mktemp("web"), upstream, PORT, {
        "HOME": str(saved),
        "REGCACHE_WEB_MAX_FLOWS": "60", "REGCACHE_REGISTRIES": "DOCKERHUB,GHCR,QUAY", "REGCACHE_TAG_TTL": str(TTL),
        # Generous: mitmweb 12 checks its password (argon2) on every /flows, some 0.4 s each on a
        # busy machine, and the upstream hangs while the tests read /flows.
        "REGCACHE_UPSTREAM_TIMEOUT": "20",
        "GHCR_UPSTREAM": private_upstream.url, "GHCR_CACHE": "none", "GHCR_USERNAME": USER, "GHCR_PASSWORD": PASSWORD,
        "QUAY_UPSTREAM": quay_upstream.url, "QUAY_CACHE": f"http://127.0.0.1:{PORT + 2}",
    }, ("--web",)).start()
    yield stack
    assert stack.stop() == 0


def web_login(stack: Stack) -> str:
    """The query of the UI's URL that `regcache up --web` printed: `?token=...` where mitmweb asks for one."""
    [url] = [m[0] for line in stack.output if (m := re.search(rf"{WEB_UI}/?(\?token=\S+)?", line))]
    return re.search(r"\?token=\S+", url)[0] if "?token=" in url else ""


def web_flows(login: str) -> list[dict]:
    status, _, body = http_get(f"{WEB_UI}/flows{login}")
    assert status == 200
    return json.loads(body)


def shown_url(flow: dict) -> str:
    """What mitmweb's Path column shows of a flow of /flows (its `pretty_url`, in both 11 and 12)."""
    request = flow["request"]
    port = "" if {"http": 80, "https": 443}.get(request["scheme"]) == request["port"] else f":{request['port']}"
    return f"{request['scheme']}://{request['pretty_host']}{port}{request['path']}"


def rows_labelled(login: str, labels: set[str]) -> dict[str, dict]:
    """The flows by label, once every one of `labels` is there (a flow gets its outcome in its
    label just after the client got its answer)."""
    flows = poll(lambda: web_flows(login), lambda flows: labels <= {flow["comment"] for flow in flows})
    by_label = {flow["comment"]: flow for flow in flows}
    assert labels <= by_label.keys(), sorted(by_label)
    return by_label


def blob_size(image, digest: str) -> int:
    return (image.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).stat().st_size


def test_regcache_up_web_prints_a_login_that_mitmweb_asks_for(web_stack):
    login = web_login(web_stack)
    assert bool(login) == mitmweb_has_password()
    if login:
        assert http_get(f"{WEB_UI}/flows")[0] == 403
        assert http_get(f"{WEB_UI}/flows?token=wrong")[0] == 403
        assert login.removeprefix("?token=") not in repr([command_line(pid) for pid in child_pids(web_stack.process.pid)])


def test_regcache_up_web_rows_name_each_pull_and_mark_it_a_miss_then_a_hit(web_stack, images, tmp_path):
    login = web_login(web_stack)
    image, host = images["small"], f"docker.io.{TEST_DOMAIN}:{PORT}"
    layer = image.blob_digests[-1]
    size = human_bytes(blob_size(image, layer))
    manifest = f"docker.io library/small manifest 1.0"
    blob = f"docker.io library/small blob {layer[:19]}"
    for outcome, marker in (("miss", "🔵"), ("hit", "🟢")):
        result = skopeo("copy", "--src-tls-verify=false", f"docker://{host}/{image.reference}", f"oci:{tmp_path / outcome}:1.0")
        assert result.returncode == 0, result.stderr
        # Cold, the layer is a 307 to the proxy's download of it on the data plane, which the
        # cache's own fetch of it follows too; warm, a small layer the proxy reads from storage.
        blob_label = f"307 miss · {blob}" if outcome == "miss" else f"200 hit · {size} · {blob}"
        labels = {f"200 {outcome} · {manifest}", blob_label}
        if outcome == "miss":
            labels.add(f"307 · upstream fetch: {blob}")
        rows = rows_labelled(login, labels)
        # The Path column: what skopeo asked regcache for, not the cache it went to.
        assert shown_url(rows[f"200 {outcome} · {manifest}"]).split("://")[1] == f"{host}/v2/library/small/manifests/1.0"
        assert shown_url(rows[blob_label]).split("://")[1] == f"{host}/v2/library/small/blobs/{layer}"
        assert {rows[label]["marked"] for label in labels if "upstream fetch" not in label} == {marker}
        assert cache_holds(web_stack.data_dir / "dockerhub/storage", layer), "the cache stored it from the download"
    # Small blobs the proxy read from the cache's storage keep no body once sent (one more
    # flow's end drops it): mitmweb would otherwise hold up to REGCACHE_DATAPLANE_MIN_SIZE per row.
    http_get(f"http://127.0.0.1:{PORT}/v2/", host=host)
    flows = poll(lambda: web_flows(login), lambda flows: all(
        f["response"]["contentLength"] is None for f in flows if f["comment"].startswith("200 hit") and " blob " in f["comment"]))
    assert [f["comment"] for f in flows if f["comment"].startswith("200 hit") and " blob " in f["comment"]
            and f["response"]["contentLength"] is not None] == []
    # No pings (skopeo's, and the cache's before each upstream fetch), no placeholder destination.
    assert [] == [shown_url(f) for f in flows if f["request"]["path"] in ("/v2", "/v2/") or f["request"]["port"] == 1]
    assert {f["request"]["pretty_host"] for f in flows if "upstream fetch" not in f["comment"]} == {f"docker.io.{TEST_DOMAIN}"}


def test_regcache_up_web_lists_bounded_flows_without_client_credentials(web_stack, images):
    login, image, host = web_login(web_stack), images["small"], f"docker.io.{TEST_DOMAIN}:{PORT}"
    manifest = f"http://127.0.0.1:{PORT}/v2/{image.name}/manifests/{image.tag}"
    status, _, _ = http_get(manifest, host=host, headers={"Authorization": "Bearer client-secret", "Accept": MANIFEST_TYPES})
    assert status == 200
    flows = poll(lambda: web_flows(login), lambda flows: any(shown_url(f).endswith(f"{host}/v2/{image.name}/manifests/1.0") for f in flows))
    assert "client-secret" not in json.dumps(flows)
    # A client's own credentials are dropped before mitmweb ever stores the flow.
    assert [] == [v for f in flows for k, v in f["request"]["headers"] if k.lower() == "authorization"]

    blob = f"http://127.0.0.1:{PORT}/v2/{image.name}/blobs/{image.blob_digests[0]}"
    for _ in range(100):
        assert http_get(blob, host=host, method="HEAD")[0] == 200
    assert len(web_flows(login)) == 60


def test_mitmweb_lists_no_credential_while_the_upstream_hangs(web_stack, private_upstream, images):
    image, login = images["small"], web_login(web_stack)
    manifest = f"http://127.0.0.1:{PORT}/v2/{image.name}/manifests/{image.tag}"
    status, _, _ = http_get(manifest, host=GHCR, headers={"Accept": MANIFEST_TYPES})
    assert status == 200  # the upstream's challenge (Basic) is known: no lookup before our header goes on
    secrets = [PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]
    answers = []
    pulls = [threading.Thread(target=lambda: answers.append(http_get(manifest, host=GHCR, timeout=60, headers={"Accept": MANIFEST_TYPES})[0])) for _ in range(3)]
    os.kill(private_upstream.process.pid, signal.SIGSTOP)  # connections still open (the kernel accepts them): a hang
    try:
        for pull in pulls:
            pull.start()
        assert poll(lambda: web_stack.metrics().get(("regcache_requests_in_flight", ()), 0), lambda count: count >= 3) >= 3
        for _ in range(5):  # while they hang
            assert not [s for s in secrets if s in json.dumps(web_flows(login))]
    finally:
        os.kill(private_upstream.process.pid, signal.SIGCONT)
        for pull in pulls:
            pull.join(60)
    assert answers == [200, 200, 200]
    flows = web_flows(login)
    assert not [s for s in secrets if s in json.dumps(flows)]
    # Rows show the client's request; where it went is the flow's server connection.
    sent = [v for f in flows if (f.get("server_conn") or {}).get("address") == ["127.0.0.1", private_upstream.port]
            for k, v in f["request"]["headers"] if k.lower() == "authorization"]
    assert sent and set(sent) == {"<redacted by regcache>"}  # listed again once answered


def test_regcache_up_web_marks_a_manifest_served_stale(web_stack, quay_upstream, images):
    login, image, host = web_login(web_stack), images["small"], f"quay.io.{TEST_DOMAIN}:{PORT}"
    manifest = f"http://127.0.0.1:{PORT}/v2/{image.name}/manifests/{image.tag}"
    assert http_get(manifest, host=host, headers={"Accept": MANIFEST_TYPES})[0] == 200  # in the cache now
    quay_upstream.stop()
    try:
        time.sleep(TTL)  # the tag is stale: the upstream would be asked, and is down
        assert http_get(manifest, host=host, headers={"Accept": MANIFEST_TYPES})[0] == 200
        row = rows_labelled(login, {f"200 stale · quay.io {image.name} manifest {image.tag}"}).popitem()[1]
    finally:
        quay_upstream.start()
        # Back up before anything else runs: while an upstream is down, regcache probes them.
        poll(lambda: json.loads(web_stack.admin("/ready")[2])["upstreams"]["quay.io"], lambda state: state == "up", timeout=15)
    assert row["marked"] == "🟡"
    assert shown_url(row) == f"http://{host}/v2/{image.name}/manifests/{image.tag}"


def upstream_secrets() -> list[str]:
    """The private upstream's password as it could be written: plain, or in the Basic header regcache adds."""
    return [PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]


def read_back(path: Path, image) -> list:
    """The flows of a saved file, read back with `mitmdump -nr` (it must read them all and show the
    pulls) and with mitmproxy's reader."""
    home = path.parent / "read-back-home"  # mitmdump's own options file: none
    home.mkdir(exist_ok=True)
    result = subprocess.run([str(Path(sys.executable).with_name("mitmdump")), "-nr", str(path)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "HOME": str(home)})
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert f"/v2/{image.name}/manifests/{image.tag}" in result.stdout
    with path.open("rb") as f:
        return list(io.FlowReader(f).stream())


def check_saved_pulls(flows: list, image) -> None:
    """The pulls of `pull_for_saving` are there with regcache's labels (plain values in their
    metadata, and their label as the comment), and the upstream credential is not."""
    manifests = [f.metadata["regcache"] for f in flows if f.metadata.get("regcache", {}).get("kind") == "manifest"]
    ghcr = {"answered_by": "backend", "registry": "ghcr.io", "repository": image.name, "kind": "manifest",
            "reference": image.tag, "upstream_fetch": False, "cache": None, "status": 200, "error": None}
    assert [m for m in manifests if {k: v for k, v in m.items() if k != "bytes"} == ghcr and m["bytes"] > 0]
    assert [m for m in manifests if m["registry"] == "docker.io" and m["status"] == 200 and m["cache"] in ("hit", "miss")]
    assert f"200 · ghcr.io {image.name} manifest {image.tag}" in {f.comment for f in flows}
    sent = [v for f in flows for k, v in f.request.headers.items(multi=True)
            if k.lower() == "authorization" and f.metadata.get("regcache", {}).get("registry") == "ghcr.io"]
    assert sent and set(sent) == {"<redacted by regcache>"}


def pull_for_saving(image) -> None:
    """A manifest from an uncached upstream that needs regcache's credentials, and one through a cache."""
    for host in (GHCR, f"docker.io.{TEST_DOMAIN}:{PORT}"):
        status, _, _ = http_get(f"http://127.0.0.1:{PORT}/v2/{image.name}/manifests/{image.tag}", host=host,
                                headers={"Accept": MANIFEST_TYPES})
        assert status == 200


def test_mitmweb_saves_flows_with_their_labels_and_without_upstream_credentials(web_stack, images, tmp_path):
    """What mitmweb's Save menu fetches (/flows/dump): every listed flow, readable again."""
    login, image = web_login(web_stack), images["small"]
    pull_for_saving(image)
    rows_labelled(login, {f"200 · ghcr.io {image.name} manifest {image.tag}"})
    status, _, body = http_get(f"{WEB_UI}/flows/dump{login}")
    assert status == 200 and body
    assert not [s for s in upstream_secrets() if s.encode() in body]
    (tmp_path / "dump").write_bytes(body)
    check_saved_pulls(read_back(tmp_path / "dump", image), image)


def test_ctrl_c_after_pulls_stops_regcache_up_web_quietly_and_exits_0(web_stack, images, tmp_path):
    """Last in this module: it stops the stack. The pull leaves the cache's kept-alive
    connections to its egress listener open, which mitmproxy used to leave for asyncio.run to
    cancel (a CancelledError traceback each, on Python 3.11 and 3.12)."""
    image = images["small"]
    assert pull(f"docker.io.{TEST_DOMAIN}:{PORT}", image.reference, tmp_path / "pulled") == image.manifest_digest
    assert web_stack.stop(signal.SIGINT) == 0
    assert not [line for line in web_stack.output if "Traceback" in line or "CancelledError" in line]


def test_flows_saved_as_they_end_and_as_har_keep_labels_and_no_upstream_credentials(web_stack, images, saved):
    """After the stack stopped (the test above stops it; run alone, this one does): the file
    save_stream_file wrote, and the HAR file hardump wrote at the stop, of every pull in this module."""
    web_stack.stop()
    image, flows_file, har_file = images["small"], saved / "flows", saved / "flows.har"
    assert not [s for s in upstream_secrets() if s.encode() in flows_file.read_bytes()]
    check_saved_pulls(read_back(flows_file, image), image)
    har = har_file.read_text()
    assert not [s for s in upstream_secrets() if s in har]
    entries = json.loads(har)["log"]["entries"]
    sent = [h["value"] for e in entries for h in e["request"]["headers"]
            if h["name"].lower() == "authorization" and e["request"]["url"].startswith(f"http://{GHCR}")]
    assert sent and set(sent) == {"<redacted by regcache>"}
