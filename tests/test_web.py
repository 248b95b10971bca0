"""mitmweb: labelled flows, a bounded flow list, no credentials; unit tests with mitmproxy's own
View addon (what mitmweb stores flows in), then `regcache up --web` end to end."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import threading

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.view import View
from mitmproxy.test import taddons, tflow

from regcache_core.mitm.keys import INJECTED, RECORD, TARGET, UPSTREAM
from regcache_core.mitm.settings import Settings
from regcache_core.mitm.web import WebView
from regcache_core.config import DEFAULTS, parse_config
from regcache_core.launcher import mitmweb_has_password
from regcache_core.pull_log import PullRecord
from regcache_core.routing import route
from regcache_core.web import flow_label

from parts import (
    MANIFEST_TYPES, PORT_BASES, TEST_DOMAIN, UPSTREAM_OFFSET, Stack, Upstream, child_pids, command_line, docker_io_stack,
    htpasswd_auth, http_get, poll, pull, skopeo,
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
    assert flow_label(target, record=record) == "docker.io library/small blob sha256:abababababab · 200 miss"
    failed = PullRecord("t", "c", "docker.io", "library/small", "blob", LAYER, "GET", 502, 0, 1, "b", error="refused")
    assert flow_label(target, record=failed).endswith("· error: refused")
    assert flow_label(target, upstream_fetch=True).startswith("upstream fetch: docker.io library/small blob")
    assert flow_label(None) == "answered by regcache"

    view, web = View(), WebView(Settings())
    with taddons.context(view, web):
        flow = finished_flow()
        flow.metadata[TARGET], flow.metadata[RECORD] = target, failed
        web.response(flow)
        assert flow.comment.endswith("· error: refused") and flow.marked


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
def web_stack(tmp_path_factory, upstream, private_upstream) -> Stack:
    stack = docker_io_stack(tmp_path_factory.mktemp("web"), upstream, PORT, {
        "REGCACHE_WEB_MAX_FLOWS": "60", "REGCACHE_REGISTRIES": "DOCKERHUB,GHCR",
        "GHCR_UPSTREAM": private_upstream.url, "GHCR_CACHE": "none", "GHCR_USERNAME": USER, "GHCR_PASSWORD": PASSWORD,
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


def test_regcache_up_web_prints_a_login_that_mitmweb_asks_for(web_stack):
    login = web_login(web_stack)
    assert bool(login) == mitmweb_has_password()
    if login:
        assert http_get(f"{WEB_UI}/flows")[0] == 403
        assert http_get(f"{WEB_UI}/flows?token=wrong")[0] == 403
        assert login.removeprefix("?token=") not in repr([command_line(pid) for pid in child_pids(web_stack.process.pid)])


def test_regcache_up_web_shows_labelled_bounded_flows_without_credentials(web_stack, images, tmp_path):
    login = web_login(web_stack)
    image, host = images["small"], f"docker.io.{TEST_DOMAIN}:{PORT}"
    result = skopeo("copy", "--src-tls-verify=false", f"docker://{host}/{image.reference}", f"oci:{tmp_path / 'pulled'}:1.0")
    assert result.returncode == 0, result.stderr
    layer = image.blob_digests[-1]
    labels = {
        "docker.io library/small manifest 1.0 · 200 miss",
        f"docker.io library/small blob {layer[:19]} · 200 miss",
        f"upstream fetch: docker.io library/small blob {layer[:19]} · 200",
    }
    # A flow gets its outcome in its label just after the client got its answer.
    flows = poll(lambda: web_flows(login), lambda flows: labels <= {flow["comment"] for flow in flows})
    assert labels <= {flow["comment"] for flow in flows}
    blob = next(f for f in flows if f["comment"].startswith(f"docker.io library/small blob {layer[:19]}"))
    assert blob["response"]["contentLength"] is None  # streamed: the body was never kept

    status, _, _ = http_get(f"http://127.0.0.1:{PORT}/v2/", host=host, headers={"Authorization": "Bearer client-secret"})
    assert status == 200
    flows = web_flows(login)
    assert "client-secret" not in json.dumps(flows)
    # A client's own credentials are dropped before mitmweb ever stores the flow.
    assert [] == [v for f in flows for k, v in f["request"]["headers"] if k.lower() == "authorization"]

    for _ in range(100):
        http_get(f"http://127.0.0.1:{PORT}/v2/", host=host)
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
    sent = [v for f in flows if f["request"]["host"].startswith("127.0.0.1") and f["request"]["port"] == private_upstream.port
            for k, v in f["request"]["headers"] if k.lower() == "authorization"]
    assert sent and set(sent) == {"<redacted by regcache>"}  # listed again once answered


def test_ctrl_c_after_pulls_stops_regcache_up_web_quietly_and_exits_0(web_stack, images, tmp_path):
    """Last in this module: it stops the stack. The pull leaves the cache's kept-alive
    connections to its egress listener open, which mitmproxy used to leave for asyncio.run to
    cancel (a CancelledError traceback each, on Python 3.11 and 3.12)."""
    image = images["small"]
    assert pull(f"docker.io.{TEST_DOMAIN}:{PORT}", image.reference, tmp_path / "pulled") == image.manifest_digest
    assert web_stack.stop(signal.SIGINT) == 0
    assert not [line for line in web_stack.output if "Traceback" in line or "CancelledError" in line]
