"""`regcache stats`: pulls, bytes and hit ratios per registry and image, read from the pull log.

A *pull* is a manifest GET (by tag or by digest) answered 2xx: what Docker Hub counts as a
pull. A `docker pull` of a single-platform image makes one (HEAD by tag, GET by digest); of a
multi-platform image two (the index, then the platform's manifest). HEADs, blobs and refused
requests are not pulls, but their bytes count. The slowest transfers are successful GETs
of manifests and blobs; a transfer the client dropped is not slow, so it is left out.

The hit ratio is hits / (hits + misses) over records whose `cache` says which (`stale` counts
as a hit: it was served from the cache); "n/a" when no record of that group says. A redirect
(3xx) is not counted there: the proxy's 307 to the data plane and the data plane's transfer
are two records of one hit, and only the transfer (which carries the bytes) counts. Lines that
are not whole, well-typed records (a line cut short by
a crash, garbage) are counted and skipped. One pass, constant memory apart from the groups.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable
from dataclasses import dataclass

from ..routing import short_reference

# Field -> accepted types; every field of a PullRecord that the statistics read.
REQUIRED_FIELDS = {
    "time": (str,), "client": (str,), "method": (str,), "status": (int,), "bytes": (int,), "duration_ms": (int,),
    "registry": (str, type(None)), "repository": (str, type(None)), "kind": (str, type(None)),
    "reference": (str, type(None)), "cache": (str, type(None)), "error": (str, type(None)),
}
REFUSED = "(refused)"  # group of requests that named no mapped registry


@dataclass
class Totals:
    requests: int = 0
    pulls: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0

    def add(self, record: dict) -> None:
        self.requests += 1
        self.pulls += is_pull(record)
        self.bytes += record["bytes"]
        if not 300 <= record["status"] < 400:
            self.hits += record["cache"] in ("hit", "stale")
            self.misses += record["cache"] == "miss"

    @property
    def hit_ratio(self) -> float | None:
        known = self.hits + self.misses
        return round(self.hits / known, 4) if known else None

    def as_dict(self) -> dict:
        return {"requests": self.requests, "pulls": self.pulls, "bytes": self.bytes, "hit_ratio": self.hit_ratio}


def parse_record(line: str) -> dict | None:
    """The record on one log line, or None when the line is not a whole, well-typed record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    for name, types in REQUIRED_FIELDS.items():
        if name not in record or not isinstance(record[name], types) or isinstance(record[name], bool):
            return None
    if record["bytes"] < 0 or record["duration_ms"] < 0:
        return None
    return record


def is_pull(record: dict) -> bool:
    return record["kind"] == "manifest" and record["method"] == "GET" and 200 <= record["status"] < 300


def image_name(record: dict) -> str | None:
    return f"{record['registry']}/{record['repository']}" if record["registry"] and record["repository"] else None


def summarize(lines: Iterable[str], slowest: int = 10) -> dict:
    """Statistics of a pull log's lines, as a JSON-ready dict (groups sorted biggest first)."""
    total, registries, images, clients = Totals(), {}, {}, {}
    slow: list[tuple[int, int, dict]] = []  # min-heap of (duration, line number, record)
    malformed = 0
    first = last = None
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        record = parse_record(line)
        if record is None:
            malformed += 1
            continue
        total.add(record)
        registries.setdefault(record["registry"] or REFUSED, Totals()).add(record)
        clients.setdefault(record["client"], Totals()).add(record)
        if image := image_name(record):
            images.setdefault(image, Totals()).add(record)
        first = min(first or record["time"], record["time"])
        last = max(last or record["time"], record["time"])
        if image and record["method"] == "GET" and 200 <= record["status"] < 300 and not record["error"]:
            entry = (record["duration_ms"], number, record)
            (heapq.heappushpop if len(slow) >= slowest else heapq.heappush)(slow, entry)
    return {
        "records": total.requests,
        "malformed_lines": malformed,
        "from": first,
        "to": last,
        "total": total.as_dict(),
        "registries": _ranked(registries, "registry"),
        "images": _ranked(images, "image"),
        "clients": _ranked(clients, "client"),
        "slowest": [_slow_entry(record) for _, _, record in sorted(slow, key=lambda e: (-e[0], e[1]))],
    }


def _ranked(groups: dict[str, Totals], key: str) -> list[dict]:
    ordered = sorted(groups.items(), key=lambda item: (-item[1].pulls, -item[1].bytes, item[0]))
    return [{key: name, **totals.as_dict()} for name, totals in ordered]


def _slow_entry(record: dict) -> dict:
    return {
        "image": image_name(record), "kind": record["kind"], "reference": record["reference"],
        "client": record["client"], "time": record["time"], "bytes": record["bytes"],
        "duration_ms": record["duration_ms"], "cache": record["cache"],
    }


def format_table(summary: dict, top: int = 10) -> str:
    """The summary for people: totals, then per-registry, top images, top clients, slowest."""
    lines = [
        f"{summary['records']} requests from {summary['from'] or '-'} to {summary['to'] or '-'}; "
        f"{summary['malformed_lines']} malformed lines skipped",
        "",
    ]
    columns = ("pulls", "requests", "bytes", "hit ratio")
    for title, key, rows in (
        ("registry", "registry", summary["registries"]),
        (f"top {top} images", "image", summary["images"][:top]),
        (f"top {top} clients", "client", summary["clients"][:top]),
    ):
        cells = [(r[key], str(r["pulls"]), str(r["requests"]), human_bytes(r["bytes"]), ratio(r["hit_ratio"])) for r in rows]
        lines += table((title, *columns), cells) + [""]
    cells = [
        (f"{r['image']} {r['kind']} {short_reference(r['reference']) or ''}".rstrip(), f"{r['duration_ms'] / 1000:.3f}s", human_bytes(r["bytes"]),
         r["client"], r["cache"] or "n/a", r["time"])
        for r in summary["slowest"][:top]
    ]
    lines += table((f"slowest {len(cells)} transfers", "duration", "bytes", "client", "cache", "time"), cells)
    return "\n".join(lines)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    if not rows:
        return [header[0], "  (none)"]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    # First column left-aligned (names), the rest right-aligned (numbers).
    render = lambda cells: "  ".join(  # noqa: E731
        cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))
    ).rstrip()
    return [render(header), *map(render, rows)]


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def human_bytes(count: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    exponent = 0
    while exponent < len(units) - 1 and count >= 1024 ** (exponent + 1):
        exponent += 1
    return f"{count} B" if exponent == 0 else f"{count / 1024 ** exponent:.1f} {units[exponent]}"
