"""mitmweb: labelled flows, a bounded flow list, no credentials; unit tests with mitmproxy's own
View addon (what mitmweb stores flows in). `regcache up --web` end to end: tests/e2e/test_web.py."""

from __future__ import annotations

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.view import View
from mitmproxy.test import taddons, tflow

from regcache_core.mitm.flow_notes import note
from regcache_core.mitm.router import send_to
from regcache_core.mitm.settings import Settings
from regcache_core.mitm.web import WebView
from regcache_core.config import DEFAULTS, parse_config
from regcache_core.observe.pull_log import PullRecord
from regcache_core.routing import route
from regcache_core.observe.web import flow_label, flow_marker

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
            note(flow).target, note(flow).record = target, result
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
    note(flow).client_host, note(flow).client_path = client_host, client_path
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
        note(fetch).egress_for = CONFIG.registries[0]
        note(fetch).egress = route(CONFIG, "GET", "docker.io.registry.example.test:5000", f"/v2/library/small/blobs/{LAYER}")
        web.responseheaders(fetch)
        assert fetch.request.pretty_url == f"https://registry-1.docker.io/v2/library/small/blobs/{LAYER}"


def test_pings_are_not_listed():
    view, web = View(), WebView(Settings())
    with taddons.context(view, web):
        ping, manifest = tflow.tflow(), tflow.tflow()
        note(ping).target = route(CONFIG, "GET", "docker.io.registry.example.test:5000", "/v2/")
        note(manifest).target = route(CONFIG, "GET", "docker.io.registry.example.test:5000", "/v2/a/b/manifests/1")
        for flow in (ping, manifest):
            web.requestheaders(flow)
            view.add([flow])  # what the view does at requestheaders, after ours
        assert list(view) == [manifest] and view.get_by_id(ping.id) is ping


def test_a_flow_carrying_our_credentials_is_not_listed_until_they_are_redacted():
    view, web = View(), WebView(Settings())
    with taddons.context(view, web):
        flow = tflow.tflow()  # in flight
        view.add([flow])  # what the view does at requestheaders
        note(flow).upstream, note(flow).injected = object(), True  # UpstreamCredentials.request
        flow.request.headers["Authorization"] = "Basic c2VjcmV0"
        web.request(flow)
        assert list(view) == [] and view.get_by_id(flow.id) is flow and not flow.error  # kept, not killed
        view.update([flow])  # as the view's own hooks do: still unlisted
        assert list(view) == []
        note(flow).injected = False  # UpstreamCredentials.responseheaders redacted it
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
