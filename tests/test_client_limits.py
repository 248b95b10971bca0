"""client_limits and log_throttle without mitmproxy: the per-address cap, the request-head
deadline, and log lines at most once a minute per source."""

from __future__ import annotations

from regcache_core.access.limits import ClientLimits
from regcache_core.observe.log_throttle import LogThrottle, held_back


def test_an_address_holds_at_most_its_cap_and_gets_room_as_connections_close():
    limits = ClientLimits(max_per_address=2, head_timeout=10)
    assert limits.admit("a1", "10.0.0.1") and limits.admit("a2", "10.0.0.1")
    assert not limits.admit("a3", "10.0.0.1")
    assert limits.admit("b1", "10.0.0.2")  # another address is not affected
    limits.closed("a3")  # refused ones were never counted
    assert not limits.admit("a4", "10.0.0.1")
    limits.closed("a1")
    assert limits.admit("a5", "10.0.0.1")


def test_a_head_is_due_from_connect_and_from_the_end_of_the_last_exchange_never_during_one():
    now = [0.0]
    limits = ClientLimits(max_per_address=10, head_timeout=10, clock=lambda: now[0])
    limits.admit("idle", "10.0.0.1")
    limits.admit("busy", "10.0.0.1")
    limits.head_arrived("busy")
    now[0] = 9.9
    assert limits.overdue() == []
    now[0] = 10.0
    assert limits.overdue() == ["idle"] and limits.overdue() == []  # listed once
    now[0] = 500  # a long blob transfer: no deadline while it runs
    assert limits.overdue() == []
    limits.head_arrived("busy")  # a second HTTP/2 stream
    limits.exchange_ended("busy")
    now[0] = 600
    assert limits.overdue() == []  # one stream still runs
    limits.exchange_ended("busy")
    now[0] = 609.9
    assert limits.overdue() == []
    now[0] = 610
    assert limits.overdue() == ["busy"]


def test_log_lines_once_a_minute_per_source_saying_how_many_were_held_back():
    now = [0.0]
    throttle = LogThrottle(clock=lambda: now[0])
    assert throttle.allow("10.0.0.1") == 0 and throttle.allow("10.0.0.2") == 0
    assert [throttle.allow("10.0.0.1") for _ in range(3)] == [None, None, None]
    now[0] = 60
    held = throttle.allow("10.0.0.1")
    assert held == 3 and held_back(held) == " (3 more since the last such line)" and held_back(0) == ""
