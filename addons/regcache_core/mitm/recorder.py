"""Recorder: one PullRecord per client request, handed to the pull log (pull_log.py's PullLogger)
and the metrics; a cache's upstream fetches get a log line instead. Also counts streamed bytes.

Each sink gets every record whatever another does: a pull log on a full disk must not stop the
metrics (or the answer), and says so once a minute, not with a traceback per request."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mitmproxy import http
from mitmproxy.flow import Error

from ..observe.log_throttle import LogThrottle, held_back
from ..observe.metrics import Metrics
from ..observe import pull_log
from ..observe.pull_log import PullRecord
from .flow_notes import AnsweredBy, note, write_labels

logger = logging.getLogger(__name__)

SINK_WARNING_INTERVAL = 60.0  # seconds between two warnings about one failing sink


class ByteCounter:
    """A response stream that passes chunks through unchanged and counts them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.count += len(chunk)
        return chunk


class Recorder:
    """Builds one PullRecord per client request, when it ends or fails, and hands it to every sink.

    Also keeps the in-flight gauge: up when a routed request arrives, down exactly once when
    its flow ends (response or error, whichever comes first; mitmproxy ends every flow with one).
    """

    def __init__(self, metrics: Metrics, sinks: dict[str, Callable[[PullRecord], None]], clock=time.monotonic) -> None:
        self.metrics = metrics
        self.sinks = sinks  # what each is, for its warnings -> the sink
        self._warnings = LogThrottle(SINK_WARNING_INTERVAL, clock)  # one per failing sink

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow_note = note(flow)
        if flow_note.target is not None:
            flow_note.in_flight = True
            self.metrics.request_started()
        write_labels(flow)  # what a flow saved while in flight keeps

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        flow_note = note(flow)
        target = flow_note.target or flow_note.egress
        # Blobs always stream (a redirect we follow leads to a blob on a CDN); smaller bodies
        # stream once stream_large_bodies says so. What regcache answered itself is in memory.
        if flow_note.answered_by is AnsweredBy.REGCACHE:
            return
        if flow.response.stream is True or flow_note.redirect is not None or (target and target.kind == "blob"):
            flow_note.byte_counter = flow.response.stream = ByteCounter()

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        flow_note = note(flow)
        if flow_note.in_flight:
            flow_note.in_flight = False
            self.metrics.request_finished()
        if flow_note.record is not None:
            return
        record = flow_note.record = pull_record(flow, time.time())
        write_labels(flow)
        if flow_note.egress_for is not None:
            # A cache's upstream fetch, not a client's pull: the log keeps one line per client
            # request. A fetch sent to a spool was logged by SingleFlight, its download by spool/download.py.
            if flow_note.answered_by is not AnsweredBy.SPOOL:
                log_upstream_fetch(flow, record)
            return
        self.deliver(record)

    def deliver(self, record: PullRecord) -> None:
        """Hand a record to every sink, whatever another does."""
        for name, sink in self.sinks.items():
            try:
                sink(record)
            except Exception as e:
                self._sink_failed(name, e)

    def _sink_failed(self, name: str, error: Exception) -> None:
        if (held := self._warnings.allow(name)) is not None:
            logger.warning("regcache: the %s failed to take a request's record: %s: %s%s; the other sinks still get it",
                           name, type(error).__name__, error, held_back(held))


def pull_record(flow: http.HTTPFlow, now: float) -> PullRecord:
    flow_note = note(flow)
    target = flow_note.target
    response = flow.response
    counter = flow_note.byte_counter
    if counter is not None:
        sent = counter.count
    else:
        sent = len(response.raw_content or b"") if response and flow.request.method != "HEAD" else 0
    if response:
        status = response.status_code
    else:  # mitmproxy answers a failed exchange with 502, and a killed one with nothing
        status = 502 if flow.error and flow.error.msg != Error.KILLED_MESSAGE else 0
    return pull_log.pull_record(
        started=flow.request.timestamp_start,
        finished=now,
        client=flow.client_conn.peername[0] if flow.client_conn.peername else "",
        registry=target.registry.name if target else None,
        repository=target.repository if target else None,
        kind=target.kind if target else None,
        reference=target.reference if target else None,
        method=flow.request.method,
        status=status,
        sent=sent,
        # Only what routing's backend answered names it: a 307 to the data plane, a refusal, a
        # blob HEAD answered from the spools are the proxy's own answers.
        backend=target.backend if target and not flow_note.answered else None,
        cache=flow_note.cache,
        error=flow.error.msg if flow.error else None,
    )


def log_upstream_fetch(flow: http.HTTPFlow, record: PullRecord) -> None:
    # No query: a redirect's target URL may carry a CDN's signature.
    flow_note = note(flow)
    what = f"redirect to {flow.request.host}" if flow_note.redirect is not None else flow.request.path.partition("?")[0]
    logger.info("upstream fetch for %s: %s %s -> %s, %d bytes%s", flow_note.egress_for.name,
                record.method, what, record.status, record.bytes, f", error: {record.error}" if record.error else "")
