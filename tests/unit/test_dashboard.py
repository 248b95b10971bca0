"""deploy/grafana/regcache-dashboard.json, importable as is: valid JSON, a Prometheus datasource
asked for at import, ids unique, a query in every panel, and only metrics regcache exports.
(tests/e2e/test_dashboard.py checks them against a real stack's /metrics.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regcache_core.observe.metrics import Metrics
from tests.support.promql import metric_names

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "regcache-dashboard.json"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> list[str]:
    return [target["expr"] for panel in board["panels"] for target in panel["targets"]]


def exported_names() -> set[str]:
    """The sample names Metrics exposes, whether a series has been made yet or not."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in Metrics().registry.collect() for suffix in suffixes[family.type]}


def test_a_prometheus_datasource_is_asked_for_at_import_and_every_query_uses_it():
    board = dashboard()
    assert [(i["name"], i["type"], i["pluginId"]) for i in board["__inputs"]] == [("DS_PROMETHEUS", "datasource", "prometheus")]
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in board["panels"]:
        assert panel["datasource"] == source and all(t["datasource"] == source for t in panel["targets"]), panel["title"]


def test_every_panel_has_a_query_and_an_id_of_its_own():
    panels = dashboard()["panels"]
    assert all(panel["targets"] and all(t["expr"].strip() for t in panel["targets"]) for panel in panels)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    assert all(len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]) for panel in panels)


def test_queries_read_only_metrics_regcache_exports():
    named = set().union(*(metric_names(q) for q in queries(dashboard())))
    assert named and named <= exported_names(), named - exported_names()


@pytest.mark.parametrize("expr, names", [
    ('sum by (registry, cache) (rate(regcache_requests_total{kind=~"manifest|blob"}[$__rate_interval]))',
     {"regcache_requests_total"}),
    ("histogram_quantile(0.99, sum by (le, kind) (rate(regcache_request_duration_seconds_bucket[5m])))",
     {"regcache_request_duration_seconds_bucket"}),
    ('a_total / on (registry) group_left b + label_replace(c, "x", "$1", "y", "(.*)")', {"a_total", "b", "c"}),
    ("sum without (le) (d offset 5m) > bool 3", {"d"}),
])
def test_metric_names_of_an_expression(expr, names):
    assert metric_names(expr) == names


def test_an_unknown_function_is_no_metric():
    with pytest.raises(ValueError, match="rat"):
        metric_names("rat(regcache_requests_total[5m])")
