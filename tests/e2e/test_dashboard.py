"""The Grafana dashboard against a real stack: after a cold and a warm pull (spools, the data
plane, a disk budget run), every metric each panel's queries read is in /metrics, and the bytes
by path show the data plane's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.parts import PORT_BASES, TEST_DOMAIN, docker_io_stack, poll, pull
from tests.support.promql import metric_names

PORT = PORT_BASES["test_dashboard"]
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "regcache-dashboard.json"


@pytest.fixture(scope="module")
def budgeted_stack(tmp_path_factory, upstream):
    stack = docker_io_stack(tmp_path_factory.mktemp("dashboard"), upstream, PORT, {
        "REGCACHE_MAX_DISK": "10G", "DOCKERHUB_MAX_DISK": "5G",  # both budgets: the panel draws either
    }).start()
    yield stack
    assert stack.stop() == 0


def test_every_metric_a_panel_reads_is_exported(budgeted_stack, images, tmp_path):
    image = images["small"]
    for n in (1, 2):  # cold (followed spools), then warm (from the data plane)
        assert pull(f"docker.io.{TEST_DOMAIN}:{PORT}", image.reference, tmp_path / f"pull{n}") == image.manifest_digest
    # A budget run follows a blob pull by 2 s.
    metrics = poll(budgeted_stack.metrics, lambda m: any(name == "regcache_cache_disk_used_bytes" for name, _ in m), timeout=30)
    scraped = {name for name, _ in metrics}
    assert metrics[("regcache_sent_bytes_total", (("path", "dataplane"), ("registry", "docker.io")))] > 0
    panels = json.loads(DASHBOARD.read_text())["panels"]
    missing = {panel["title"]: sorted(set().union(*(metric_names(t["expr"]) for t in panel["targets"])) - scraped)
               for panel in panels}
    assert not {title: names for title, names in missing.items() if names}, sorted(scraped)
