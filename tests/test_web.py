"""mitmweb: labelled flows, a bounded flow list, no credentials; unit tests with mitmproxy's own
View addon (what mitmweb stores flows in), then `regcache up --web` end to end."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import threading
import time

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.view import View
from mitmproxy.test import taddons, tflow

from regcache_core.mitm.keys import CLIENT_HOST, CLIENT_PATH, EGRESS, EGRESS_FOR, INJECTED, RECORD, TARGET, UPSTREAM
from regcache_core.mitm.router import send_to
from regcache_core.mitm.settings import Settings
from regcache_core.mitm.web import WebView
from regcache_core.config import DEFAULTS, parse_config
from regcache_core.stack.launcher import mitmweb_has_password
from regcache_core.observe.pull_log import PullRecord
from regcache_core.routing import route
from regcache_core.observe.stats import human_bytes
from regcache_core.observe.web import flow_label, flow_marker

from parts import (
    MANIFEST_TYPES, PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, Stack, Upstream, cache_holds, child_pids, command_line,
    docker_io_stack, htpasswd_auth, http_get, poll, pull, skopeo,
)

CONFIG = parse_config({**DEFAULTS,
    "REGISTRY_DOMAIN": "registry.example.test", "REGCACHE_PORT": "5000", "REGCACHE_ADMIN_HOST": "127.0.0.1",
    "REGCACHE_ADMIN_PORT": "5070", "REGCACHE_WEB_MAX_FLOWS": "10", "REGCACHE_REGISTRIES": "HUB",
    "HUB_REGISTRY": "docker.io", "HUB_UPSTREAM": "https://registry-1.docker.io", "HUB_CACHE": "http://127.0.0.1:5001",
})
LAYER = "sha256:" + "ab" * 32


def finished_flow():
    flow = tflow.tflow(resp=True)
    flow.live = False
    return flow


def test_trimming_keeps_the_flow_count_at_the_limit_and_never_drops_live_flows():
    view, web = View(), WebView(Settings())
    with taddons.context(view, web) as tctx:
        tctx.configure(web, regcache_web_max_flows=10)
        live = tflow.tflow()  # a transfer still running, oldest of all
        view.add([live])
        for _ in range(50):
            flow = finished_flow()
            view.add([flow])
            web.response(flow)
            assert view.store_count() <= 10
        assert view.store_count() == 10
        assert live in view.resolve("@all") and not live.error  # kept, and not killed


def test_the_max_flows_option_is_checked():
    web = WebView(Settings())
    with taddons.context(web) as tctx:
        with pytest.raises(exceptions.OptionsError, match="at least 1"):
            tctx.configure(web, regcache_web_max_flows=0)


def test_flows_are_labelled_with_registry_image_kind_and_outcome():
    target = route(CONFIG, "GET", "docker.io.registry.example.test:5000", f"/v2/library/small/blobs/{LAYER}")
    assert flow_label(target) == "docker.io library/small blob sha256:abababababab"
    record = PullRecord("t", "c", "docker.io", "library/small", "blob", LAYER, "GET", 200, 5, 1, "b", cache="miss")
    assert flow_label(target, record=record) == "200 miss · docker.io library/small blob sha256:abababababab"
    streamed = PullRecord("t", "c", "docker.io", "library/small", "blob", LAYER, "GET", 200, 3 << 20, 1, "b", cache="hit")
    assert flow_label(target, record=streamed, streamed=True) == "200 hit · 3.0 MiB · docker.io library/small blob sha256:abababababab"
    failed = PullRecord("t", "c", "docker.io", "library/small", "blob", LAYER, "GET", 502, 0, 1, "b", error="refused")
    assert flow_label(target, record=failed).startswith("error: refused · docker.io")
    assert flow_label(target, upstream_fetch=True).startswith("upstream fetch: docker.io library/small blob")
    assert flow_label(None) == "answered by regcache"

    view, web = View(), WebView(Settings())
    with taddons.context(view, web):
        for result, marker in ((failed, ":warning:"), (record, ":large_blue_circle:"), (streamed, ":green_circle:")):
            flow = finished_flow()
            flow.metadata[TARGET], flow.metadata[RECORD] = target, result
            web.response(flow)
            assert flow.marked == marker
        stale = PullRecord("t", "c", "docker.io", "library/small", "manifest", "1.0", "GET", 200, 5, 1, "b", cache="stale")
        assert flow_marker(stale) == ":yellow_circle:"
        assert flow_marker(PullRecord("t", "c", "ghcr.io", "a/b", "manifest", "1.0", "GET", 200, 5, 1, "b")) is None


def routed_flow(client_host: str, client_path: str, backend: str, backend_path: str):
    """A flow as Router leaves it: the request pointed at a backend, what the client sent kept."""
    flow = tflow.tflow(resp=True)
    flow.client_conn.sockname = ("127.0.0.1", 5000)
    flow.client_conn.timestamp_tls_setup = None  # plain HTTP
    flow.request.headers["Host"] = client_host
    flow.metadata[CLIENT_HOST], flow.metadata[CLIENT_PATH] = client_host, client_path
    send_to(flow.request, backend, backend_path)
    return flow


def test_a_row_shows_the_request_as_regcache_received_it_once_it_has_gone():
    view, web = View(), WebView(Settings())
    with taddons.context(view, web):
        client = routed_flow("docker.io.registry.example.test:5000", "/v2/library/small/manifests/1.0",
                             "http://127.0.0.1:5001", "/v2/library/small/manifests/1.0")
        view.add([client])
        assert client.request.pretty_url == "http://127.0.0.1:5001/v2/library/small/manifests/1.0"  # in flight
        web.responseheaders(client)
        assert client.request.pretty_url == "http://docker.io.registry.example.test:5000/v2/library/small/manifests/1.0"
        assert client.request.headers["Host"] == "docker.io.registry.example.test:5000"

        ns = routed_flow("regcache.example.test:5000", "/v2/library/small/manifests/1.0?ns=docker.io",
                         "http://127.0.0.1:5001", "/v2/library/small/manifests/1.0")
        web.response(ns)  # answered here, before any backend was asked: no responseheaders
        assert ns.request.pretty_url == "http://regcache.example.test:5000/v2/library/small/manifests/1.0?ns=docker.io"

        # A cache's upstream fetch keeps the upstream's URL: where it went is the point.
        fetch = routed_flow("127.0.0.1:5080", f"/v2/library/small/blobs/{LAYER}", "https://registry-1.docker.io",
                            f"/v2/library/small/blobs/{LAYER}")
        fetch.metadata[EGRESS_FOR] = CONFIG.registries[0]
        fetch.metadata[EGRESS] = route(CONFIG, "GET", "docker.io.registry.example.test:5000", f"/v2/library/small/blobs/{LAYER}")
        web.responseheaders(fetch)
        assert fetch.request.pretty_url == f"https://registry-1.docker.io/v2/library/small/blobs/{LAYER}"


def test_pings_are_not_listed():
    view, web = View(), WebView(Settings())
    with taddons.context(view, web):
        ping, manifest = tflow.tflow(), tflow.tflow()
        ping.metadata[TARGET] = route(CONFIG, "GET", "docker.io.registry.example.test:5000", "/v2/")
        manifest.metadata[TARGET] = route(CONFIG, "GET", "docker.io.registry.example.test:5000", "/v2/a/b/manifests/1")
        for flow in (ping, manifest):
            web.requestheaders(flow)
            view.add([flow])  # what the view does at requestheaders, after ours
        assert list(view) == [manifest] and view.get_by_id(ping.id) is ping


def test_a_flow_carrying_our_credentials_is_not_listed_until_they_are_redacted():
    view, web = View(), WebView(Settings())
    with taddons.context(view, web):
        flow = tflow.tflow()  # in flight
        view.add([flow])  # what the view does at requestheaders
        flow.metadata[UPSTREAM], flow.metadata[INJECTED] = object(), True  # UpstreamCredentials.request
        flow.request.headers["Authorization"] = "Basic c2VjcmV0"
        web.request(flow)
        assert list(view) == [] and view.get_by_id(flow.id) is flow and not flow.error  # kept, not killed
        view.update([flow])  # as the view's own hooks do: still unlisted
        assert list(view) == []
        del flow.metadata[INJECTED]  # UpstreamCredentials.responseheaders redacted it
        web.responseheaders(flow)
        assert list(view) == [flow]


def test_mitmweb_on_11_0_refuses_a_non_loopback_ui_without_a_password():
    web = WebView(Settings())
    with taddons.context(web) as tctx:
        tctx.options.add_option("web_host", str, "127.0.0.1", "as mitmweb declares it")
        tctx.configure(web, web_host="::1")
        with pytest.raises(exceptions.OptionsError, match="web_password"):
            tctx.configure(web, web_host="0.0.0.0")


# An argon2 hash of "ui-secret" (what mitmweb's web_password takes as it is).
UI_SECRET_HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$bW9ja2hhc2htb2NraGFzaG1vY2toYXNo"


def mitmweb_context(web: WebView, with_password: bool) -> taddons.context:
    """mitmproxy's test context with mitmweb's options (11.1.2 and later also have web_password)."""
    tctx = taddons.context(web)
    tctx.options.add_option("web_host", str, "127.0.0.1", "as mitmweb declares it")
    if with_password:
        tctx.options.add_option("web_password", str, "", "as mitmweb declares it")
    return tctx


def test_mitmweb_with_a_password_option_binds_elsewhere_only_with_a_password():
    web = WebView(Settings())
    with mitmweb_context(web, with_password=True) as tctx:
        with pytest.raises(exceptions.OptionsError, match="needs a password: set REGCACHE_WEB_PASSWORD"):
            tctx.configure(web, web_host="0.0.0.0")
        tctx.configure(web, web_host="0.0.0.0", web_password=UI_SECRET_HASH)


def test_regcache_web_password_becomes_mitmwebs_and_is_refused_where_mitmweb_has_none():
    settings = Settings()
    settings.config = parse_config({**DEFAULTS, "REGCACHE_WEB_PASSWORD": UI_SECRET_HASH})
    web = WebView(settings)
    with mitmweb_context(web, with_password=True) as tctx:
        tctx.options.add_option("regcache_env_file", str, "", "as Settings declares it")
        tctx.configure(web, regcache_env_file=".env")
        assert tctx.options.web_password == UI_SECRET_HASH  # a hash is passed on as it is
        tctx.configure(web, web_host="0.0.0.0")
    with mitmweb_context(web, with_password=False) as tctx:
        with pytest.raises(exceptions.OptionsError, match="REGCACHE_WEB_PASSWORD is set, but this mitmweb"):
            tctx.options.add_option("regcache_env_file", str, ".env", "as Settings declares it")


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
def web_stack(tmp_path_factory, upstream, private_upstream, quay_upstream) -> Stack:
    stack = docker_io_stack(tmp_path_factory.mktemp("web"), upstream, PORT, {
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


def test_ctrl_c_after_pulls_stops_regcache_up_web_quietly_and_exits_0(web_stack, images, tmp_path):
    """Last in this module: it stops the stack. The pull leaves the cache's kept-alive
    connections to its egress listener open, which mitmproxy used to leave for asyncio.run to
    cancel (a CancelledError traceback each, on Python 3.11 and 3.12)."""
    image = images["small"]
    assert pull(f"docker.io.{TEST_DOMAIN}:{PORT}", image.reference, tmp_path / "pulled") == image.manifest_digest
    assert web_stack.stop(signal.SIGINT) == 0
    assert not [line for line in web_stack.output if "Traceback" in line or "CancelledError" in line]
