"""The mitmproxy addons without a running proxy: mitmproxy's own test context and test flows."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from types import SimpleNamespace

import bcrypt
import pytest
from mitmproxy import http
from mitmproxy import io as mitmproxy_io
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow, tutils

from tests.support.parts import REPO
from regcache_core.mitm import make_addons
from regcache_core.mitm.answers import Answer, answer_after_failure, refusal_answer, send_answer
from regcache_core.mitm.budget import DiskBudget
from regcache_core.mitm.client_access import ClientAccess
from regcache_core.mitm.client_limits import ConnectionLimits
from regcache_core.mitm.cold_blobs import ColdBlobs
from regcache_core.mitm.drain import Drain
from regcache_core.mitm.hits import HitMarker
from regcache_core.mitm.manifest_responder import ManifestResponder
from regcache_core.mitm.request_path import RequestPath
from regcache_core.mitm.spec_answers import SpecAnswers
from regcache_core.mitm.tasks import ScheduledTasks
from regcache_core.mitm.services import Services
from regcache_core.mitm.upstream_requests import UpstreamRequests
from regcache_core.mitm.web import WebView
from regcache_core.mitm.flow_notes import note
from regcache_core.mitm.recorder import ByteCounter, Recorder, pull_record
from regcache_core.mitm.router import Router
from regcache_core.mitm.settings import Settings
from regcache_core.config import DEFAULTS, parse_config
from regcache_core.observe.log_throttle import LogThrottle
from regcache_core.observe.metrics import Metrics
from regcache_core.upstream.redirects import RedirectSigner
from regcache_core.routing import Refusal, Target, upstream_unreachable

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
    route(router, flow)
    return flow


def route(router: Router, flow: http.HTTPFlow) -> None:
    """Routing's part of RequestPath: the flow pointed at its backend, or answered."""
    if (answer := asyncio.run(router.route(flow))) is not None:
        send_answer(flow, answer)


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
    assert note(flow).target.registry.name in ("docker.io", "ghcr.io")


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
    assert note(flow).target is None
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
    counter = note(flow).byte_counter = ByteCounter()
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


def marked(flow: http.HTTPFlow, response: http.Response | None, error: str | None = None) -> str | None:
    """The pull log's `cache` for a client flow that HitMarker watched from its head to its end."""
    hits = HitMarker()
    hits.requestheaders(flow)
    flow.response = response
    if error:
        flow.error = tflow.terr(error)
        hits.error(flow)
    else:
        hits.response(flow)
    return finished(flow)["cache"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_an_answer_that_served_no_content_is_no_hit(method):
    """regcache stats counts hits from these marks: a 500 of the cache, a 404, a failed exchange
    and regcache's own 503 served nothing from the cache."""
    blob = f"/v2/library/small/blobs/{DIGEST}"
    assert marked(routed(client_flow(blob, method=method)), http.Response.make(200, b"")) == "hit"
    assert marked(routed(client_flow(blob, method=method)), http.Response.make(304, b"")) == "hit"
    for status in (500, 503, 404, 401):
        assert marked(routed(client_flow(blob, method=method)), http.Response.make(status, b"{}")) is None, status
    assert marked(routed(client_flow(blob, method=method)), None, error="Connection refused") is None


def test_a_mark_set_before_the_answer_goes_when_the_answer_serves_nothing():
    """A tag whose digest regcache knows is asked of the cache by that digest, marked a hit
    before the cache answers; a 307 to the data plane keeps its mark (its transfer carries the bytes)."""
    manifest = routed(client_flow("/v2/library/small/manifests/1.0"))
    note(manifest).cache = "hit"
    assert marked(manifest, http.Response.make(500, b"{}")) is None
    cold = routed(client_flow(f"/v2/library/small/blobs/{DIGEST}"))
    note(cold).cache = "miss"
    assert marked(cold, http.Response.make(307, b"", {"Location": "http://127.0.0.1:5002/x"})) == "miss"


@pytest.mark.parametrize("make_answer", [
    lambda flow: setattr(flow, "response", http.Response.make(200, b"{}")),  # the backend's answer
    lambda flow: send_answer(flow, refusal_answer(flow.request.method, Refusal(503, "UNAVAILABLE", "down"))),
    lambda flow: send_answer(flow, Answer(http.Response.make(307, b"", {"Location": "http://127.0.0.1:5002/x"}))),
])
def test_an_answer_to_a_request_routed_by_ns_names_the_registry_and_one_routed_by_host_does_not(make_answer):
    """The distribution spec's Registry Proxying: `OCI-Namespace` on answers to `?ns=` requests."""
    answers = SpecAnswers()
    for host, expected in (("127.0.0.1:5000", "docker.io"), (HUB, None)):
        flow = routed(client_flow(f"/v2/library/small/blobs/{DIGEST}?ns=Docker.io", host))
        make_answer(flow)
        answers.responseheaders(flow)
        asyncio.run(answers.response(flow))
        assert flow.response.headers.get("OCI-Namespace") == expected, host


def test_refused_clients_are_each_counted_and_logged_once_a_minute_per_address(tmp_path, caplog):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"a-pass", bcrypt.gensalt(4)).decode() + "\n")
    settings, metrics, now = Settings(), Metrics(), [0.0]
    settings.config = parse_config({**DEFAULTS, "REGISTRY_DOMAIN": "regcache.test", "REGCACHE_HTPASSWD": str(htpasswd),
                                    "REGCACHE_CLIENTS": "10.0.0.0/8"})
    access = ClientAccess(settings, metrics)
    access.configure({"regcache_env_file"})
    access.refusals = LogThrottle(clock=lambda: now[0])

    def check(address: str, authorization: str | None = None) -> int | None:
        flow = client_flow("/v2/")
        flow.client_conn.peername = (address, 40000)
        if authorization:
            flow.request.headers["Authorization"] = authorization
        answer = asyncio.run(access.check(flow))
        return answer and answer.response.status_code

    def refusals(reason: str) -> float:
        return metrics.registry.get_sample_value("regcache_client_refusals_total", {"reason": reason}) or 0

    caplog.set_level(logging.INFO, logger="regcache_core.mitm.client_access")
    assert [check("192.0.2.7") for _ in range(100)] == [403] * 100
    assert check("10.0.0.9") == 401  # a Basic client's first try: counted, not logged
    wrong = "Basic " + base64.b64encode(b"alice:wrong").decode()
    assert [check("10.0.0.9", wrong) for _ in range(3)] == [401] * 3
    assert check("10.0.0.9", "Basic " + base64.b64encode(b"alice:a-pass").decode()) is None
    now[0] = 61.0
    assert check("192.0.2.7") == 403
    assert (refusals("network"), refusals("credentials"), refusals("no_credentials")) == (101, 3, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "refused client 192.0.2.7: its address is not in REGCACHE_CLIENTS",
        "refused client 10.0.0.9: wrong user name or password (REGCACHE_HTPASSWD)",
        "refused client 192.0.2.7: its address is not in REGCACHE_CLIENTS (99 more since the last such line)",
    ]
    access.done()


def test_a_client_request_whose_upstream_failed_gets_registry_json_on_its_connection_not_mitmproxys_page(monkeypatch):
    written = []
    writer = SimpleNamespace(write=written.append, close=lambda: written.append(b"(closed)"))
    monkeypatch.setattr("regcache_core.mitm.answers.client_writer", lambda flow: writer)
    flow = routed(client_flow("/v2/x/manifests/1.0", host="ghcr.io.regcache.test:5000"))
    flow.live, flow.error = True, tflow.terr("Connection refused")  # as in the error hook
    answer_after_failure(flow, refusal_answer("GET", upstream_unreachable(CONFIG.registry("ghcr.io"), "refused")))
    head, body = written[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nConnection: close" in head
    assert f"\r\ncontent-length: {len(body)}".encode() in head.lower() and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert "(refused)" in json.loads(body)["errors"][0]["message"] and written[1:] == [b"(closed)"]
    assert flow.error.msg == flow.error.KILLED_MESSAGE  # so mitmproxy sends no page of its own after it
    assert finished(flow)["status"] == 503


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_cold_blob_while_its_upstream_is_down_is_regcaches_503_not_sent_to_the_cache(method):
    """The cache does not hold it and cannot fetch it: it would answer registry:2's 500."""
    down = {"docker.io": None}

    async def no_spool(*_):
        down["docker.io"] = "refused"  # the download found it down
        return None

    async def no_head(_):
        return None, False

    services = SimpleNamespace(upstream_state=SimpleNamespace(reason_down=down.get),
                               blobs=SimpleNamespace(follow=no_spool, head=no_head))
    settings = Settings()
    settings.config = parse_config({**DEFAULTS, "REGISTRY_DOMAIN": "regcache.test", "GHCR_CACHE": "none"})
    cold_blobs = ColdBlobs(settings, services, Metrics())
    if method == "HEAD":
        down["docker.io"] = "timeout"  # known down before the HEAD
    flow = routed(client_flow(f"/v2/library/small/blobs/{DIGEST}", method=method))
    note(flow).client_host, note(flow).cold_blob = HUB, True
    answer = asyncio.run(cold_blobs.answer(flow))
    body = refusal_answer("GET", upstream_unreachable(CONFIG.registry("docker.io"), down["docker.io"], DIGEST)).response.content
    assert (answer.response.status_code, answer.response.headers["Content-Length"]) == (503, str(len(body)))
    assert answer.response.content == (b"" if method == "HEAD" else body)
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNAVAILABLE" and "docker.io" in error["message"] and DIGEST in error["message"]


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
    assert isinstance(flow.response.stream, ByteCounter) and note(flow).byte_counter is flow.response.stream


def test_a_client_following_a_redirect_is_logged_as_the_registrys_blob_with_its_bytes():
    signer = RedirectSigner()
    flow = routed(client_flow(signer.location("https://ghcr.io/v2/x/blobs/" + DIGEST, "https://cdn.example/b?s=1", GHCR_BLOB)), signer)
    assert (flow.request.host, flow.request.path) == ("cdn.example", "/b?s=1")
    counter = note(flow).byte_counter = ByteCounter()
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


def test_a_finished_flow_saves_in_mitmproxys_format_with_plain_labels_and_no_routing_objects():
    flow = routed(client_flow("/v2/library/small/manifests/1.0"))
    recorder = Recorder(Metrics(), {})
    recorder.requestheaders(flow)
    flow.response = http.Response.make(200, b"{}")
    recorder.response(flow)
    out = io.BytesIO()
    mitmproxy_io.FlowWriter(out).add(flow)
    [read] = mitmproxy_io.FlowReader(io.BytesIO(out.getvalue())).stream()
    assert read.metadata == {"regcache": {
        "answered_by": "backend", "registry": "docker.io", "repository": "library/small", "kind": "manifest",
        "reference": "1.0", "upstream_fetch": False, "cache": None, "status": 200, "bytes": 2, "error": None}}


def test_hook_order():
    """mitmproxy calls the addons of each hook in the order of make_addons(); what must come first."""
    order = [type(addon) for addon in make_addons()]

    def before(first: type, then: type, why: str) -> None:
        assert order.index(first) < order.index(then), f"{first.__name__} before {then.__name__}: {why}"

    assert order[0] is ScheduledTasks, "running: tasks scheduled, not eager, before any addon starts one"
    assert order[-1] is WebView, "its hooks see every other addon's work, just before mitmweb's view sends an update"
    for addon in order[2:]:
        before(Settings, addon, "configure: the config is loaded before any addon reads it")
    for addon in order[3:]:
        before(Services, addon, "configure and running: what the addons share is built for the config before they start")
    before(ConnectionLimits, RequestPath, "requestheaders: a head's arrival is counted before its flow may be answered and killed")
    for observer in (HitMarker, Recorder, DiskBudget, Drain, WebView):
        before(RequestPath, observer, "requestheaders: it reads what the request path decided")
    before(Router, UpstreamRequests, "server_connect: a redirect target's checked address is set before the name is looked up")
    before(UpstreamRequests, WebView, "request, responseheaders: our header is on (unlisted) and redacted (listed again)")
    before(ManifestResponder, HitMarker, "response: a cache's outage answer is replaced before the hit mark is set")
    before(ManifestResponder, Recorder, "response: a cache's outage answer is replaced before it is recorded")
    before(SpecAnswers, Recorder, "response: a cache's answer is made what the spec says before it is recorded")
    before(HitMarker, Recorder, "response: the hit, miss or stale mark is set before the record is made")
    before(Recorder, WebView, "response: the label names the record")


class Step:
    """A step of the request path that notes it was asked and answers `answer`."""

    def __init__(self, asked: list, name: str, answer=None, then=None) -> None:
        self.asked, self.name, self.answer_with, self.then = asked, name, answer, then

    async def __call__(self, flow: http.HTTPFlow):
        self.asked.append(self.name)
        if self.then:
            self.then(note(flow))
        return self.answer_with


def request_path(asked: list, access=None, route=None, on_route=None) -> RequestPath:
    access_step, route_step = Step(asked, "access", access), Step(asked, "route", route, on_route)
    steps = {name: Step(asked, name) for name in ("handoff", "single flight", "cold blobs", "manifests")}
    return RequestPath(SimpleNamespace(check=access_step), SimpleNamespace(route=route_step),
                       SimpleNamespace(answer=steps["handoff"], store_down=lambda flow: asked.append("store down")),
                       SimpleNamespace(answer=steps["single flight"]),
                       SimpleNamespace(answer=steps["cold blobs"]), SimpleNamespace(answer=steps["manifests"]))


@pytest.mark.parametrize("access, route, on_route, expected", [
    ("refused", None, None, ["access"]),
    (None, "refused", None, ["access", "route"]),
    (None, None, lambda n: setattr(n, "egress", object()), ["access", "route", "single flight"]),
    (None, None, lambda n: setattr(n, "target", object()), ["access", "route", "handoff", "cold blobs", "manifests",
                                                                      "store down"]),
    (None, None, None, ["access", "route"]),  # a redirect a cache follows: on to its target
])
def test_the_request_path_asks_its_steps_in_order_and_stops_at_the_first_answer(access, route, on_route, expected):
    asked = []
    flow = client_flow("/v2/library/small/manifests/1.0")
    answer = asyncio.run(request_path(asked, access, route, on_route).decide(flow))
    assert asked == expected and answer == (access or route)
    assert (note(flow).client_host, note(flow).client_path) == (HUB, "/v2/library/small/manifests/1.0")  # kept first
