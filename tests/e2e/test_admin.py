"""The admin endpoint's backend probes and readiness answer against the session's real registry.
The rest of the admin endpoint is in tests/unit/test_admin.py."""

from __future__ import annotations

import asyncio
import json

from regcache_core.observe.admin import probe_backend, readiness
from tests.unit.test_admin import free_port


def test_probe_says_ok_for_a_registry(upstream):
    assert asyncio.run(probe_backend(upstream.url)) == "ok"


def test_readiness_needs_the_proxy_and_every_backend_and_shows_upstreams_without_judging_them(upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    upstreams = {"docker.io": "down: timeout"}
    ready = asyncio.run(readiness(True, {"docker.io": upstream.url}, upstreams))
    assert (ready.status, json.loads(ready.body)["ready"], json.loads(ready.body)["upstreams"]) == (200, True, upstreams)
    one_down = asyncio.run(readiness(True, {"docker.io": upstream.url, "ghcr.io": dead}, {}))
    assert one_down.status == 503 and json.loads(one_down.body)["backends"]["docker.io"] == "ok"
    proxy_down = asyncio.run(readiness(False, {"docker.io": upstream.url}, {}))
    assert proxy_down.status == 503 and json.loads(proxy_down.body)["proxy"] == "not serving"


def test_readiness_reports_a_cache_whose_disk_cannot_take_more(upstream):
    answer = asyncio.run(readiness(True, {"docker.io": upstream.url}, {}, disks={"docker.io": "disk full (/data)"}))
    assert answer.status == 503 and json.loads(answer.body)["backends"] == {"docker.io": "disk full (/data)"}
    assert asyncio.run(readiness(True, {"docker.io": upstream.url}, {}, disks={"docker.io": "ok"})).status == 200
