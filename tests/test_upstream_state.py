"""Upstream state without mitmproxy: the reasons given, one warning per change, the probe."""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.error

import pytest

from regcache_core.observe.metrics import Metrics
from regcache_core.upstream.client import NoAnswer
from regcache_core.upstream.state import UpstreamState, failure_reason


@pytest.mark.parametrize("error, reason", [
    (TimeoutError(), "timeout"),
    (ConnectionRefusedError(111, "Connection refused"), "refused"),
    (socket.gaierror(-2, "Name or service not known"), "name lookup failed"),
    (urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution")), "name lookup failed"),
    (urllib.error.URLError(TimeoutError("timed out")), "timeout"),
    ("[Errno 111] Connect call failed ('127.0.0.1', 1)", "refused"),  # mitmproxy's flow error
    ("Connection killed: name lookup failed for x.example (timeout)", "name lookup failed"),
])
def test_failures_are_named_as_users_read_them(error, reason):
    assert failure_reason(error) == reason


def test_one_warning_when_down_one_when_back_and_the_probe_brings_it_back(caplog):
    answers = [NoAnswer("timeout"), None]

    async def probe(upstream):
        if (answer := answers.pop(0)) is not None:
            raise answer

    async def run():
        metrics = Metrics()
        state = UpstreamState(metrics, probe, retry_every=0.01)
        for _ in range(3):
            state.went_down("docker.io", "https://registry-1.docker.io", "refused")
        down = (state.reason_down("docker.io"), metrics.registry.get_sample_value("regcache_upstream_up", {"registry": "docker.io"}))
        for _ in range(100):
            if state.reason_down("docker.io") is None:
                break
            await asyncio.sleep(0.01)
        return down, state.states(["docker.io"]), answers

    with caplog.at_level(logging.WARNING):
        down, states, left = asyncio.run(run())
    assert down == ("refused", 0) and states == {"docker.io": "up"} and left == []
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and "unreachable (refused)" in lines[0] and "reachable again" in lines[1]
