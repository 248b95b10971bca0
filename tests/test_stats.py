"""`regcache stats` on a recorded pull log with broken lines (tests/data), numbers checked by hand."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from regcache_core.cli import main
from regcache_core.observe.pull_log import PullRecord
from regcache_core.observe.stats import human_bytes, parse_record, summarize

LOG = Path(__file__).parent / "data" / "pull-with-broken-lines.log"


def test_summary_of_a_log_with_broken_lines():
    summary = summarize(LOG.read_text().splitlines(), slowest=3)
    assert (summary["records"], summary["malformed_lines"]) == (14, 4)  # garbage, [..], wrong type, cut short
    assert summary["total"] == {"requests": 14, "pulls": 4, "bytes": 157500286, "hit_ratio": 0.3333}
    assert summary["registries"] == [
        {"registry": "docker.io", "requests": 11, "pulls": 3, "bytes": 157429487, "hit_ratio": 0.3333},
        {"registry": "ghcr.io", "requests": 2, "pulls": 1, "bytes": 70655, "hit_ratio": None},
        {"registry": "(refused)", "requests": 1, "pulls": 0, "bytes": 144, "hit_ratio": None},
    ]
    assert summary["images"] == [
        {"image": "docker.io/library/small", "requests": 7, "pulls": 2, "bytes": 142430, "hit_ratio": 0.3333},
        {"image": "docker.io/library/big", "requests": 3, "pulls": 1, "bytes": 157287055, "hit_ratio": 0.3333},
        {"image": "ghcr.io/library/small", "requests": 2, "pulls": 1, "bytes": 70655, "hit_ratio": None},
    ]
    assert [(c["client"], c["pulls"], c["hit_ratio"]) for c in summary["clients"]] == [
        ("10.0.0.2", 2, 0.75), ("10.0.0.1", 2, 0.0), ("10.0.0.3", 0, 0.0), ("127.0.0.1", 0, None),
    ]
    # The 30 s transfer the client dropped is not among the slowest; a 404 is not a transfer.
    assert [(s["image"], s["kind"], s["duration_ms"]) for s in summary["slowest"]] == [
        ("docker.io/library/big", "blob", 2500), ("docker.io/library/small", "blob", 120), ("ghcr.io/library/small", "blob", 90),
    ]


def test_cli_prints_tables_and_json(capsys):
    assert main(["stats", "--top", "2", str(LOG)]) == 0
    table = capsys.readouterr().out
    assert "14 requests from 2026-11-28T05:08:10.420+00:00 to 2026-11-28T05:08:23.420+00:00; 4 malformed lines skipped" in table
    assert "docker.io      3        11  150.1 MiB      33.3%" in table
    assert "ghcr.io        1         2   69.0 KiB        n/a" in table
    assert "top 2 images" in table and "ghcr.io/library/small " not in table.split("top 2 clients")[0]
    assert "docker.io/library/big blob sha256:bbbbbbbbbbbb      2.500s  100.0 MiB  10.0.0.2   miss" in table
    assert main(["stats", "--json", str(LOG)]) == 0
    assert json.loads(capsys.readouterr().out) == summarize(LOG.read_text().splitlines())


def test_cli_reads_the_configured_pull_log_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REGCACHE_PULL_LOG", str(LOG))
    monkeypatch.chdir(tmp_path)  # no .env here
    assert main(["stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 14


def test_cli_says_clearly_when_the_log_is_missing(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "missing.log")]) == 2
    assert "cannot read the pull log" in capsys.readouterr().err


def test_an_empty_log_gives_an_empty_summary(capsys):
    summary = summarize([])
    assert summary["records"] == 0 and summary["total"]["hit_ratio"] is None and summary["slowest"] == []
    assert main(["stats", "/dev/null"]) == 0
    assert "(none)" in capsys.readouterr().out


def test_parse_record_rejects_wrong_types():
    good = json.loads(LOG.read_text().splitlines()[0])
    assert parse_record(json.dumps(good)) == good
    for field, bad in (("status", "200"), ("bytes", -1), ("bytes", True), ("registry", 5), ("time", None)):
        assert parse_record(json.dumps(good | {field: bad})) is None
    assert parse_record(json.dumps({k: v for k, v in good.items() if k != "cache"})) is None


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 << 20, 3 << 40, 5000 << 40)] == [
        "0 B", "1023 B", "1.0 KiB", "5.0 MiB", "3.0 TiB", "5000.0 TiB"]


def test_stale_counts_as_a_hit_it_was_served_from_the_cache():
    lines = [json.dumps(asdict(PullRecord("2026-12-01T00:00:00.000+00:00", "10.0.0.1", "docker.io", "library/small",
                                          "manifest", "1.0", "GET", 200, 500, 1, "http://127.0.0.1:5001", cache)))
             for cache in ("stale", "miss")]
    assert summarize(lines, slowest=1)["total"]["hit_ratio"] == 0.5


def test_a_blob_handed_to_the_data_plane_counts_once():
    """The proxy's 307 and the data plane's transfer are one hit, and their bytes are the transfer's."""
    def record(status, size, backend):
        return json.dumps({
            "time": "2026-12-01T10:00:00.000+00:00", "client": "10.0.0.9", "registry": "docker.io",
            "repository": "library/big", "kind": "blob", "reference": "sha256:" + "a" * 64, "method": "GET",
            "status": status, "bytes": size, "duration_ms": 50, "backend": backend, "cache": "hit", "error": None,
        })

    summary = summarize([record(307, 0, None), record(200, 1000, "dataplane"),
                         record(200, 10, "http://127.0.0.1:5001").replace('"hit"', '"miss"')])
    assert summary["total"] == {"requests": 3, "pulls": 0, "bytes": 1010, "hit_ratio": 0.5}
