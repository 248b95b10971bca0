"""What both lanes share. The e2e lane's namespaces and servers are in tests/e2e/conftest.py."""

from __future__ import annotations

import platform

from mitmproxy import version as mitmproxy_version


def pytest_report_header() -> str:
    """CI runs the suite on two legs: the header says which this is."""
    return f"mitmproxy {mitmproxy_version.VERSION} on Python {platform.python_version()}"
