"""The mitmproxy addons, one module per concern. Each hook is short: it reads the flow, calls a
plain function (routing, upstream auth, pull log, metrics, disk budget, mitmweb labels) and applies the
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
from .client_access import ClientAccess
from .client_limits import ConnectionLimits
from .budget import DiskBudget
from .drain import Drain
from .hits import HitMarker
from .pull_log import PullLogger
from .recorder import Recorder
from .router import Router
from .settings import MirrorDefaults, Settings
from .spec_answers import SpecAnswers
from .upstream import UpstreamCredentials
from .web import WebView


def make_addons() -> list:
    settings = Settings()
    signer = RedirectSigner()
    metrics = Metrics()
    pull_logger = PullLogger(settings)
    budget = DiskBudget(settings, metrics)
    # Order matters: hooks run in this order. UpstreamCredentials redacts what it injected
    # before mitmweb's view (added after the scripts) sends a flow update; HitMarker sets the
    # hit/miss that Recorder hands to the pull log and metrics; SpecAnswers fixes an answer
    # before Recorder records it.
    return [
        settings,
        MirrorDefaults(settings),
        ConnectionLimits(settings),
        ClientAccess(settings),
        Router(settings, signer),
        UpstreamCredentials(settings, signer, metrics),
        HitMarker(),
        SpecAnswers(),
        pull_logger,
        budget,
        Recorder(metrics, {"pull log": pull_logger.write, "metrics": metrics.observe, "disk budget": budget.record}),
        Admin(settings, metrics, budget),
        Drain(settings),
        WebView(),
    ]
