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
from .admin import Admin
from .client_access import ClientAccess
from .client_limits import ConnectionLimits
from .cold_blobs import ColdBlobs
from .budget import DiskBudget
from .drain import Drain
from .dataplane import DataPlaneHandoff, DataPlaneRecords
from .head_bound import RequestHeadBound
from .hits import HitMarker
from .manifest_responder import ManifestResponder
from .recorder import Recorder
from .request_path import RequestPath
from .router import Router
from .services import Services
from .settings import MirrorDefaults, Settings
from .spec_answers import SpecAnswers
from .tasks import ScheduledTasks
from .single_flight import SingleFlight
from .upstream_requests import UpstreamRequests
from .web import WebView


def make_addons() -> list:
    settings = Settings()
    signer = RedirectSigner()
    metrics = Metrics()
    hits = HitMarker()
    services = Services(settings, metrics, hits.in_flight.upstream_blob_fetch)
    metrics.watch_spool_downloads(services.downloads_running)
    budget = DiskBudget(settings, metrics, services)
    recorder = Recorder(metrics, {"pull log": services.log_pull, "metrics": metrics.observe, "disk budget": budget.record})
    access, router, handoff = ClientAccess(settings, metrics), Router(settings, signer), DataPlaneHandoff(settings, services)
    single_flight = SingleFlight(settings, services, metrics)
    cold_blobs = ColdBlobs(settings, services, metrics)
    manifests = ManifestResponder(services)
    # Hooks run in this order; tests/unit/test_addon.py's test_hook_order pins what matters. What a
    # request's head decides is RequestPath's, in one function (request_path.py); the addons
    # after it observe. Services are built when the config loads (right after Settings) and
    # closed once, by their owner. Router maps a redirect target's address before
    # UpstreamRequests connects; UpstreamRequests redacts what it injected before mitmweb's
    # view (added after the scripts) sends a flow update; ManifestResponder replaces a cache's
    # answer before HitMarker and Recorder read it, SpecAnswers before Recorder; HitMarker sets
    # the hit/miss/stale that Recorder hands to the pull log and metrics; WebView labels what
    # Recorder recorded. The data plane's records reach the same sinks.
    return [
        ScheduledTasks(),
        settings,
        services,
        MirrorDefaults(settings),
        ConnectionLimits(settings),
        RequestHeadBound(settings, metrics),
        access,
        router,
        RequestPath(access, router, handoff, single_flight, cold_blobs, manifests),
        handoff,
        UpstreamRequests(settings, services, signer),
        single_flight,
        cold_blobs,
        manifests,
        hits,
        SpecAnswers(),
        budget,
        recorder,
        DataPlaneRecords(settings, recorder.deliver, services),
        Admin(settings, metrics, budget, services),
        Drain(settings, services.downloads_running),
        WebView(settings),
    ]
