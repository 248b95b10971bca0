"""The admin endpoint's parts: backend probes, the readiness answer, the HTTP server, its settings."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from regcache_core.observe.admin import AdminServer, Answer, probe_backend, readiness
from regcache_core.config import DEFAULTS, ConfigError, parse_config

from parts import http_get


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_says_ok_for_a_registry(upstream):
    assert asyncio.run(probe_backend(upstream.url)) == "ok"


def test_probe_says_unreachable_when_nothing_listens():
    assert asyncio.run(probe_backend(f"http://127.0.0.1:{free_port()}")).startswith("unreachable")


def test_probe_gives_up_on_a_silent_backend_in_time():
    async def check():
        accepted = []  # accepts, never answers
        silent = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        async with silent:  # on Python 3.12+ its exit waits for every connection to close
            try:
                return await asyncio.wait_for(probe_backend(f"http://127.0.0.1:{port}", timeout=0.3), 5)
            finally:
                for writer in accepted:
                    writer.close()

    assert asyncio.run(check()) == "no answer within 0.3s"


def test_readiness_needs_the_proxy_and_every_backend_and_shows_upstreams_without_judging_them(upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    upstreams = {"docker.io": "down: timeout"}
    ready = asyncio.run(readiness(True, {"docker.io": upstream.url}, upstreams))
    assert (ready.status, json.loads(ready.body)["ready"], json.loads(ready.body)["upstreams"]) == (200, True, upstreams)
    one_down = asyncio.run(readiness(True, {"docker.io": upstream.url, "ghcr.io": dead}, {}))
    assert one_down.status == 503 and json.loads(one_down.body)["backends"]["docker.io"] == "ok"
    proxy_down = asyncio.run(readiness(False, {"docker.io": upstream.url}, {}))
    assert proxy_down.status == 503 and json.loads(proxy_down.body)["proxy"] == "not serving"


def test_admin_server_routes_get_requests_only():
    port = free_port()

    async def hello() -> Answer:
        return Answer(200, "text/plain", b"hello")

    async def check():
        server = AdminServer({"/hello": hello})
        await server.start("127.0.0.1", port)
        try:
            results = []
            for path, method in (("/hello", "GET"), ("/hello?x=1", "GET"), ("/nope", "GET"), ("/hello", "POST")):
                status, _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}{path}", method=method, timeout=5)
                results.append((status, body))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"garbage\r\n\r\n")
            results.append(await reader.read())
            writer.close()
            return results
        finally:
            server.close()

    ok, query, missing, post, garbage = asyncio.run(check())
    assert ok == (200, b"hello") and query == (200, b"hello")
    assert missing[0] == 404 and post[0] == 405
    assert garbage.startswith(b"HTTP/1.1 400")


BASE = {**DEFAULTS, "REGISTRY_DOMAIN": "registry.example.test", "REGCACHE_PORT": "5000", "REGCACHE_REGISTRIES": "HUB",
        "HUB_REGISTRY": "docker.io", "HUB_UPSTREAM": "https://registry-1.docker.io", "HUB_CACHE": "none",
        "REGCACHE_WEB_MAX_FLOWS": "2000"}


def test_admin_settings_default_to_loopback_5070():
    config = parse_config(DEFAULTS)
    assert (config.admin_host, config.admin_port) == ("127.0.0.1", 5070)


@pytest.mark.parametrize("settings, message", [
    ({"REGCACHE_ADMIN_PORT": "5000"}, "REGCACHE_ADMIN_PORT: 5000 is taken by REGCACHE_PORT"),
    ({"REGCACHE_ADMIN_PORT": "70000"}, "REGCACHE_ADMIN_PORT: '70000' is not a port"),
    ({"REGCACHE_ADMIN_HOST": "admin.example"}, "REGCACHE_ADMIN_HOST: 'admin.example' is not an IP address"),
    ({"REGCACHE_WEB_MAX_FLOWS": "0"}, "REGCACHE_WEB_MAX_FLOWS: '0' is not a whole number of at least 1"),
    ({"REGCACHE_ADMIN_HOST": "0.0.0.0"}, r"REGCACHE_ADMIN_TOKEN: not set, but REGCACHE_ADMIN_HOST \(0.0.0.0\) is not loopback"),
    ({"REGCACHE_MAX_CONNECTIONS_PER_CLIENT": "0"}, "REGCACHE_MAX_CONNECTIONS_PER_CLIENT: '0' is not a whole number"),
    ({"REGCACHE_HEAD_TIMEOUT": "soon"}, "REGCACHE_HEAD_TIMEOUT: 'soon' is not a whole number"),
])
def test_bad_admin_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(BASE | {"REGCACHE_ADMIN_HOST": "127.0.0.1", "REGCACHE_ADMIN_PORT": "5070"} | settings)


def test_readiness_reports_a_cache_whose_disk_cannot_take_more(upstream):
    answer = asyncio.run(readiness(True, {"docker.io": upstream.url}, {}, disks={"docker.io": "disk full (/data)"}))
    assert answer.status == 503 and json.loads(answer.body)["backends"] == {"docker.io": "disk full (/data)"}
    assert asyncio.run(readiness(True, {"docker.io": upstream.url}, {}, disks={"docker.io": "ok"})).status == 200


def test_with_a_token_metrics_and_ready_need_it_and_live_does_not():
    port = free_port()

    async def hello() -> Answer:
        return Answer(200, "text/plain", b"hello")

    async def check():
        server = AdminServer({"/metrics": hello, "/live": hello}, open_paths=("/live",))
        server.token = "admin-s3cret"
        await server.start("127.0.0.1", port)
        try:
            ask = lambda path, **headers: asyncio.to_thread(  # noqa: E731
                http_get, f"http://127.0.0.1:{port}{path}", headers=headers, timeout=5)
            return [await ask("/metrics"), await ask("/metrics", Authorization="Bearer wrong"),
                    await ask("/metrics", Authorization="bearer admin-s3cret"), await ask("/live")]
        finally:
            server.close()

    (anonymous, _, body), (wrong, _, _), (right, _, metrics), (live, _, _) = asyncio.run(check())
    assert (anonymous, wrong, right, live) == (401, 401, 200, 200)
    assert b"REGCACHE_ADMIN_TOKEN" in body and b"admin-s3cret" not in body and metrics == b"hello"


def test_an_admin_endpoint_off_loopback_with_a_token_is_accepted():
    config = parse_config(BASE | {"REGCACHE_ADMIN_HOST": "0.0.0.0", "REGCACHE_ADMIN_TOKEN": "t0ken"})
    assert config.admin_token == "t0ken" and "t0ken" not in repr(config)
