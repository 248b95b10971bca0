"""The mitmproxy addons, one module per concern. Each hook is short: it reads the flow, calls a
plain function (routing, upstream auth, pull log, metrics, mitmweb labels) and applies the
answer. Wiring is explicit, in `make_addons()`.

Two kinds of listener: the client listener on REGCACHE_PORT, and one egress listener per
cached registry, which that registry's cache uses as its upstream. Flows to an upstream (egress
flows, and client flows of uncached registries) get regcache's credentials; the client's own
Authorization header is never passed on.
"""

from __future__ import annotations

from ..metrics import Metrics
from ..redirects import RedirectSigner
from .admin import Admin
from .dataplane import DataPlaneHandoff, DataPlaneRecords
from .hits import HitMarker
from .pull_log import PullLogger
from .recorder import Recorder
from .router import Router
from .settings import MirrorDefaults, Settings
from .single_flight import SingleFlight
from .upstream import UpstreamCredentials
from .web import WebView


def make_addons() -> list:
    settings = Settings()
    signer = RedirectSigner()
    metrics = Metrics()
    pull_logger = PullLogger(settings)
    sinks = [pull_logger.write, metrics.observe]
    # Order matters: hooks run in this order. DataPlaneHandoff answers what Router routed;
    # UpstreamCredentials redacts what it injected before mitmweb's view (added after the
    # scripts) sends a flow update; SingleFlight tells HitMarker which fetches go upstream, and
    # sets the spool writer that Recorder's byte counter wraps; HitMarker sets the hit/miss that
    # Recorder hands to the pull log and metrics.
    return [
        settings,
        MirrorDefaults(settings),
        Router(settings, signer),
        DataPlaneHandoff(settings),
        UpstreamCredentials(settings, signer, metrics),
        SingleFlight(settings, metrics),
        HitMarker(),
        pull_logger,
        Recorder(metrics, sinks),
        DataPlaneRecords(settings, sinks),
        Admin(settings, metrics),
        WebView(),
    ]
