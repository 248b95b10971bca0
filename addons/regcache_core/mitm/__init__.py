"""The mitmproxy addons, one module per concern. Each hook is short: it reads the flow, calls a
plain function (routing, upstream auth, pull log, metrics, disk budget, mitmweb labels) and applies the
answer. Wiring is explicit, in `make_addons()`.

Two kinds of listener: the client listener on REGCACHE_PORT, and one egress listener per
cached registry, which that registry's cache uses as its upstream. Flows to an upstream (egress
flows, and client flows of uncached registries) get regcache's credentials; the client's own
Authorization header is never passed on.
"""

from __future__ import annotations

from ..observe.metrics import Metrics
from ..upstream.redirects import RedirectSigner
from ..upstream.client import UpstreamClient
from ..upstream.state import UpstreamState
from .admin import Admin
from .client_access import ClientAccess
from .client_limits import ConnectionLimits
from .cold_blobs import ColdBlobs
from .budget import DiskBudget
from .drain import Drain
from .dataplane import DataPlaneHandoff, DataPlaneRecords
from .hits import HitMarker
from .manifest_responder import ManifestResponder
from .pull_log import PullLogger
from .recorder import Recorder
from .router import Router
from .settings import MirrorDefaults, Settings
from .spec_answers import SpecAnswers
from .tasks import ScheduledTasks
from .single_flight import SingleFlight
from .upstream import UpstreamCredentials
from .upstream_deadlines import UpstreamDeadlines
from .web import WebView


def make_addons() -> list:
    settings = Settings()
    signer = RedirectSigner()
    metrics = Metrics()
    pull_logger = PullLogger(settings)
    budget = DiskBudget(settings, metrics)
    upstream_client = UpstreamClient()
    upstream_state = UpstreamState(metrics, upstream_client.ping)
    credentials = UpstreamCredentials(settings, signer, metrics, upstream_state, upstream_client)
    recorder = Recorder(metrics, {"pull log": pull_logger.write, "metrics": metrics.observe, "disk budget": budget.record})
    hits = HitMarker()
    single_flight = SingleFlight(settings, metrics, credentials, upstream_state, hits.in_flight.upstream_blob_fetch)
    # Order matters: hooks run in this order. DataPlaneHandoff answers what Router routed;
    # UpstreamDeadlines answers for a down upstream before UpstreamCredentials asks it for a
    # token; UpstreamCredentials redacts what it injected before mitmweb's view (added after
    # the scripts) sends a flow update; SingleFlight tells HitMarker which fetches go upstream
    # (its downloads tell it what they fetched); ManifestResponder answers
    # before HitMarker watches, and replaces a cache's answer before Recorder reads it;
    # HitMarker sets the hit/miss/stale that Recorder hands to the pull log and metrics, and
    # watches a cold blob's GET before ColdBlobs starts the download that marks it. The data
    # plane's records reach the same sinks.
    return [
        ScheduledTasks(),
        settings,
        MirrorDefaults(settings),
        ConnectionLimits(settings),
        ClientAccess(settings),
        Router(settings, signer),
        DataPlaneHandoff(settings),
        UpstreamDeadlines(settings, upstream_state),
        credentials,
        single_flight,
        ManifestResponder(settings, credentials, upstream_client, upstream_state, metrics),
        hits,
        ColdBlobs(settings, single_flight, upstream_state, metrics, hits.in_flight),
        SpecAnswers(),
        pull_logger,
        budget,
        recorder,
        DataPlaneRecords(settings, recorder.deliver),
        Admin(settings, metrics, budget, upstream_state),
        Drain(settings, single_flight.downloads_running),
        WebView(settings),
    ]
