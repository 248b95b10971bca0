"""The mitmproxy addons without a running proxy: mitmproxy's own test context and test flows."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from mitmproxy import connection, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow, tutils

from parts import REPO
from regcache_core.mitm.keys import BYTE_COUNTER, TARGET
from regcache_core.mitm.recorder import ByteCounter, Recorder, pull_record
from regcache_core.mitm.router import Router
from regcache_core.mitm.settings import Settings
from regcache_core.config import DEFAULTS, parse_config
from regcache_core.observe.metrics import Metrics
from regcache_core.upstream.redirects import RedirectSigner
from regcache_core.routing import Target

ADDON_SCRIPT = REPO / "addons" / "regcache.py"
CONFIG = parse_config({**DEFAULTS, "REGISTRY_DOMAIN": "regcache.test", "GHCR_CACHE": "none"})
HUB = "docker.io.regcache.test:5000"
DIGEST = "sha256:" + "ab" * 32
GHCR_BLOB = Target(CONFIG.registry("ghcr.io"), "blob", "x", DIGEST, f"/v2/x/blobs/{DIGEST}")  # ghcr.io is uncached


def load_script(tctx: taddons.context, env_file, **flags):
    """What `mitmdump --set regcache_env_file=ENV_FILE [flags] -s addons/regcache.py` does at start-up."""
    tctx.options.update(**flags)
    tctx.options.set(f"regcache_env_file={env_file}", defer=True)  # the script declares this option
    return tctx.script(str(ADDON_SCRIPT))


@pytest.fixture
def env_file(tmp_path, monkeypatch):
    for name in DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / ".env"
    path.write_text(f"REGCACHE_PORT=5999\nREGCACHE_DATA_DIR={tmp_path / 'data'}\n")
    return path


def test_mirror_defaults_turn_a_plain_mitmdump_into_a_mirror_on_regcache_port(env_file):
    with taddons.context(Proxyserver()) as tctx:
        load_script(tctx, env_file)
        options = tctx.options
        # The client listener, and one egress listener per cached registry (the three defaults).
        assert options.mode == ["reverse:http://127.0.0.1:1@5999"] + [
            f"reverse:http://127.0.0.1:1@127.0.0.1:{port}" for port in (5080, 5081, 5082)
        ]
        assert (options.keep_host_header, options.connection_strategy, options.stream_large_bodies) == (
            True, "lazy", "1m"
        )


def test_mirror_defaults_leave_explicit_options_alone(env_file):
    with taddons.context(Proxyserver()) as tctx:
        load_script(tctx, env_file, mode=["reverse:http://127.0.0.1:1@7000"], stream_large_bodies="64k")
        assert tctx.options.mode == ["reverse:http://127.0.0.1:1@7000"]
        assert tctx.options.stream_large_bodies == "64k"
        assert tctx.options.keep_host_header is True  # not given, so still regcache's default


def test_a_bad_setting_is_one_logged_error_naming_the_variable(env_file, caplog):
    """mitmproxy exits when an error is logged during start-up; see test_startup.py for that."""
    env_file.write_text("REGCACHE_PORT=5999\nREGCACHE_PULL_LOG_STDOUT=perhaps\n")
    with taddons.context(Proxyserver()) as tctx, caplog.at_level(logging.ERROR):
        script = load_script(tctx, env_file)
        settings = next(a for a in script.addons if isinstance(a, Settings))
        assert settings.config is None
        assert tctx.options.mode == ["regular"]  # nothing is switched on a bad config
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["regcache: REGCACHE_PULL_LOG_STDOUT: 'perhaps' is not true or false"]


def test_a_misspelt_variable_is_one_logged_warning(env_file, caplog):
    """`regcache up` leaves this warning to the proxy, so it is printed once."""
    env_file.write_text(env_file.read_text() + "DOCKERHUB_UPSTRAEM=https://mirror.example\n")
    with taddons.context(Proxyserver()) as tctx, caplog.at_level(logging.WARNING):
        load_script(tctx, env_file)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "regcache" in r.getMessage()]
    assert warnings == ["regcache: DOCKERHUB_UPSTRAEM is not a regcache setting; did you mean DOCKERHUB_UPSTREAM?"]


def client_flow(path: str, host: str = HUB, method: str = "GET", authority: str = "") -> http.HTTPFlow:
    """A flow as mitmproxy hands it to requestheaders: the client's request line and Host header."""
    request = tutils.treq(
        method=method.encode(), host="127.0.0.1", port=5000, path=path.encode(), authority=authority.encode(),
        headers=http.Headers(host=host), content=b"",
    )
    return tflow.tflow(req=request)


def routed(flow: http.HTTPFlow, signer: RedirectSigner | None = None) -> http.HTTPFlow:
    router = Router(Settings(), signer or RedirectSigner())
    router.settings.config = CONFIG
    asyncio.run(router.requestheaders(flow))
    return flow


@pytest.mark.parametrize("host, path, backend, forwarded", [
    (HUB, f"/v2/library/small/blobs/{DIGEST}", ("http", "127.0.0.1", 5001), f"/v2/library/small/blobs/{DIGEST}"),
    ("127.0.0.1:5000", "/v2/library/small/tags/list?ns=ghcr.io&n=5", ("https", "ghcr.io", 443),
     "/v2/library/small/tags/list?n=5"),
])
def test_router_sends_the_request_to_its_backend(host, path, backend, forwarded):
    flow = routed(client_flow(path, host))
    request = flow.request
    assert flow.response is None
    assert (request.scheme, request.host, request.port) == backend
    assert request.path == forwarded
    assert flow.metadata[TARGET].registry.name in ("docker.io", "ghcr.io")


@pytest.mark.parametrize("method, path, host, authority, status, code", [
    ("PUT", "/v2/library/small/manifests/1.0", HUB, "", 405, "UNSUPPORTED"),
    ("GET", "/v2/library/small/manifests/1.0", "unmapped.io.regcache.test", "", 404, "NAME_UNKNOWN"),
    ("GET", "/v2/", "127.0.0.1:5001", "127.0.0.1:5001", 400, "UNSUPPORTED"),  # absolute-form
])
def test_router_answers_refusals_itself_with_registry_error_json(method, path, host, authority, status, code):
    flow = routed(client_flow(path, host, method, authority))
    assert flow.response.status_code == status
    assert flow.response.headers["Content-Type"] == "application/json"
    assert json.loads(flow.response.content)["errors"][0]["code"] == code
    assert TARGET not in flow.metadata
    assert (flow.request.host, flow.request.port) == ("127.0.0.1", 5000)  # sent nowhere


@pytest.mark.parametrize("body_headers", [{"Content-Length": str(50 << 20)}, {"Transfer-Encoding": "chunked"}])
def test_router_answers_a_refused_request_with_a_body_before_the_body_and_ends_the_flow(body_headers):
    """mitmproxy answers only after reading a body (and crashes on a streamed one): the answer
    is written at once (see test_protocol.py) and the flow killed, which closes the connection."""
    flow = client_flow("/v2/library/small/blobs/uploads/", method="POST")
    flow.request.headers.update(body_headers)
    flow.request.data.content = None  # as in requestheaders: the body has not been read
    flow.request.stream = "content-length" in flow.request.headers  # as stream_large_bodies decided
    routed(flow)
    assert flow.error.msg == flow.error.KILLED_MESSAGE
    assert (flow.response.status_code, flow.response.headers["Connection"]) == (405, "close")
    assert finished(flow)["status"] == 405


def finished(flow: http.HTTPFlow, response: http.Response | None = None, error: str | None = None) -> dict:
    flow.response = response or flow.response
    if error:
        flow.error = tflow.terr(error)
    return pull_record(flow, now=flow.request.timestamp_start + 1.5).__dict__


def test_pull_record_of_a_served_manifest():
    flow = routed(client_flow("/v2/library/small/manifests/1.0"))
    record = finished(flow, http.Response.make(200, b"{}" * 50))
    assert record == {
        "time": "1999-12-31T23:00:00.000+00:00", "client": "127.0.0.1", "registry": "docker.io",
        "repository": "library/small", "kind": "manifest", "reference": "1.0", "method": "GET", "status": 200,
        "bytes": 100, "duration_ms": 1500, "backend": "http://127.0.0.1:5001", "cache": None, "error": None,
    }


def test_pull_record_of_a_streamed_blob_counts_the_streamed_bytes():
    flow = routed(client_flow(f"/v2/library/small/blobs/{DIGEST}"))
    counter = flow.metadata[BYTE_COUNTER] = ByteCounter()
    for chunk in (b"x" * 1000, b"y" * 24, b""):
        counter(chunk)
    record = finished(flow, http.Response.make(200, b""))
    assert (record["kind"], record["reference"], record["bytes"]) == ("blob", DIGEST, 1024)


def test_pull_record_of_a_refused_request():
    flow = routed(client_flow("/v2/library/small/manifests/1.0", method="DELETE"))
    record = finished(flow)
    assert (record["method"], record["status"], record["bytes"]) == ("DELETE", 405, len(flow.response.content))
    assert record["registry"] is record["kind"] is record["backend"] is None


def test_pull_record_of_a_head_sends_no_bytes():
    flow = routed(client_flow("/v2/library/small/manifests/1.0", method="HEAD"))
    record = finished(flow, http.Response.make(200, b"", {"Content-Length": "529"}))
    assert (record["method"], record["status"], record["bytes"]) == ("HEAD", 200, 0)


def test_pull_record_of_a_failed_exchange():
    flow = routed(client_flow(f"/v2/library/small/blobs/{DIGEST}"))
    record = finished(flow, error="Connection refused")
    assert (record["status"], record["bytes"], record["error"]) == (502, 0, "Connection refused")
    assert record["backend"] == "http://127.0.0.1:5001"


def test_pull_record_holds_no_header_value():
    flow = routed(client_flow("/v2/library/small/manifests/1.0"))
    flow.request.headers["Authorization"] = "Bearer s3cret-token"
    record = finished(flow, http.Response.make(200, b"{}", {"Set-Cookie": "session=s3cret-cookie"}))
    assert "s3cret" not in json.dumps(record)


@pytest.mark.parametrize("signature", ["%C3%A9", "00", ""])
def test_a_redirect_path_with_a_bad_signature_is_refused(signature):
    flow = routed(client_flow(f"/_regcache/redirect?url=https://cdn.example/x&sig={signature}"))
    assert flow.response.status_code == 403
    assert json.loads(flow.response.content)["errors"][0]["code"] == "DENIED"


def test_an_unexpected_error_while_routing_is_answered_not_sent_to_the_placeholder(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("regcache_core.mitm.router.route", broken)
    with caplog.at_level(logging.ERROR):
        flow = routed(client_flow("/v2/library/small/manifests/1.0"))
    assert flow.response.status_code == 500
    assert json.loads(flow.response.content)["errors"][0]["code"] == "UNKNOWN"
    assert (flow.request.host, flow.request.port) == ("127.0.0.1", 5000)
    assert "could not route" in caplog.text


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_a_signed_redirect_is_followed_for_pulls_only(method):
    signer = RedirectSigner()
    path = signer.location("https://registry-1.docker.io/v2/x/blobs/" + DIGEST, "https://cdn.example/blob", GHCR_BLOB)
    flow = routed(client_flow(path, method=method), signer)
    assert flow.response.status_code == 405
    assert (flow.request.host, flow.request.port) == ("127.0.0.1", 5000)


def test_a_followed_redirect_streams_like_a_blob():
    signer = RedirectSigner()
    path = signer.location("https://ghcr.io/v2/x/blobs/" + DIGEST, "https://cdn.example/blob", GHCR_BLOB)
    flow = routed(client_flow(path), signer)
    flow.response = http.Response.make(200, b"")  # its headers; mitmproxy has not read the body
    Recorder(Metrics(), {}).responseheaders(flow)
    assert isinstance(flow.response.stream, ByteCounter) and flow.metadata[BYTE_COUNTER] is flow.response.stream


def test_a_client_following_a_redirect_is_logged_as_the_registrys_blob_with_its_bytes():
    signer = RedirectSigner()
    flow = routed(client_flow(signer.location("https://ghcr.io/v2/x/blobs/" + DIGEST, "https://cdn.example/b?s=1", GHCR_BLOB)), signer)
    assert (flow.request.host, flow.request.path) == ("cdn.example", "/b?s=1")
    counter = flow.metadata[BYTE_COUNTER] = ByteCounter()
    counter(b"x" * 2048)
    record = finished(flow, http.Response.make(200, b""))
    assert (record["registry"], record["kind"], record["repository"], record["reference"], record["bytes"]) == (
        "ghcr.io", "blob", "x", DIGEST, 2048)


def test_a_failing_sink_warns_once_a_minute_and_the_others_still_get_every_record(caplog):
    now = [1000.0]
    received = []

    def full_disk(record):
        raise OSError(28, "No space left on device")

    recorder = Recorder(Metrics(), {"pull log": full_disk, "metrics": received.append}, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for seconds in (0, 1, 30, 61):
            now[0] = 1000.0 + seconds
            flow = routed(client_flow("/v2/library/small/manifests/1.0"))
            flow.response = http.Response.make(200, b"{}")
            recorder.response(flow)
    assert len(received) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "No space left on device" in warnings[0]
    assert "(2 more since the last such line)" in warnings[1]


def test_a_head_that_regcache_answers_itself_gets_the_headers_of_the_get_and_no_body():
    get = routed(client_flow("/v2/", host="unmapped.io.regcache.test"))
    head = routed(client_flow("/v2/", host="unmapped.io.regcache.test", method="HEAD"))
    assert head.response.status_code == get.response.status_code == 404
    assert head.response.raw_content == b""
    assert head.response.headers["Content-Length"] == get.response.headers["Content-Length"] == str(len(get.response.raw_content))


def test_a_followed_redirect_connects_to_the_address_that_was_checked():
    """The target's name is resolved once, when it is checked; the connection goes to that
    address (mitmproxy does not look the name up again), Host and SNI keep the name."""
    config = parse_config({**DEFAULTS, "REGISTRY_DOMAIN": "regcache.test", "GHCR_CACHE": "none",
                           "GHCR_UPSTREAM": "http://127.0.0.1:6000"})  # on loopback: may redirect there
    blob = Target(config.registry("ghcr.io"), "blob", "x", DIGEST, f"/v2/x/blobs/{DIGEST}")
    signer = RedirectSigner()
    target = "http://docker.io.regcache.test:6002/blob"  # conftest's /etc/hosts: 127.0.0.1
    flow = client_flow(signer.location("http://127.0.0.1:6000/v2/x/blobs/" + DIGEST, target, blob))
    router = Router(Settings(), signer)
    router.settings.config = config
    asyncio.run(router.requestheaders(flow))
    assert flow.response is None and flow.request.headers["Host"] == "docker.io.regcache.test:6002"
    server = connection.Server(address=(flow.request.host, flow.request.port))
    router.server_connect(server_hooks.ServerConnectionHookData(server=server, client=flow.client_conn))
    assert server.address == ("127.0.0.1", 6002)
    other = connection.Server(address=("cdn.example", 443))  # not a checked redirect target: left alone
    router.server_connect(server_hooks.ServerConnectionHookData(server=other, client=flow.client_conn))
    assert other.address == ("cdn.example", 443)
    router.client_disconnected(flow.client_conn)
    assert router._checked == {}
