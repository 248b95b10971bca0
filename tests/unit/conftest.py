"""Fixtures of the unit lane's Redis tests."""

from __future__ import annotations

import pytest

from tests.support.redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server of the test's own, on loopback."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
