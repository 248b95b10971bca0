"""WebView: in mitmweb, labels and marks each flow (`label_flow`), shows each request as regcache
received it (`show_as_received`), keeps the flow list bounded, and lists neither pings nor a flow
while it carries our credentials; the label, the marker and the choice of flows to list or drop
are plain functions in regcache_core/observe/web.py."""

from __future__ import annotations

from mitmproxy import ctx, exceptions, http

from ..config import DEFAULTS, is_loopback_host
from ..observe.pull_log import PullRecord
from ..routing import Target
from ..observe.web import finished_flows_beyond, flow_label, flow_marker, is_housekeeping
from .keys import ANSWERED_HERE, BYTE_COUNTER, CLIENT_HOST, CLIENT_PATH, EGRESS, EGRESS_FOR, INJECTED, RECORD, REDIRECT, TARGET
from .settings import Settings


class Unlisted:
    """A view filter: flows carrying the Authorization header regcache added are left out of the
    view's list (and so of mitmweb's /flows and its updates) until it is redacted, and pings
    always, whatever else the filter (`view_filter`) says. They stay in the view's store:
    removing a live flow kills it."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, flow) -> bool:
        return not flow.metadata.get(INJECTED) and not is_housekeeping(_labelled(flow)[0]) and self.inner(flow)


class WebView:
    """In mitmweb (or any tool with a flow view): label flows, keep the list bounded, list no
    credentials; guard the UI with REGCACHE_WEB_PASSWORD. Its hooks run after
    UpstreamCredentials' and before the view's own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sent_blobs: list[http.HTTPFlow] = []  # answered from storage, body not dropped yet

    def load(self, loader) -> None:
        loader.add_option(
            "regcache_web_max_flows", int, int(DEFAULTS["REGCACHE_WEB_MAX_FLOWS"]),
            "Finished flows mitmweb keeps; older ones are dropped so memory stays bounded.",
        )

    def configure(self, updated: set[str]) -> None:
        if "regcache_web_max_flows" in updated and ctx.options.regcache_web_max_flows < 1:
            raise exceptions.OptionsError("regcache_web_max_flows: must be at least 1")
        if "web_host" not in ctx.options.keys():
            return  # not mitmweb
        has_password = "web_password" in ctx.options.keys()  # mitmproxy 11.1.2 and later
        config = self.settings.config
        if "regcache_env_file" in updated and config is not None and config.web_password:
            if not has_password:
                raise exceptions.OptionsError(
                    "regcache: REGCACHE_WEB_PASSWORD is set, but this mitmweb (mitmproxy 11.0) has no "
                    "password: leave it empty, its UI stays on 127.0.0.1"
                )
            if not ctx.options.has_changed("web_password"):
                # A hash: mitmweb shows its options in the UI, and warns about a plain-text one.
                ctx.options.update(web_password=password_hash(config.web_password))
        if {"web_host", "web_password"} & updated and not is_loopback_host(ctx.options.web_host):
            if not has_password:
                # Its UI would be open to the network.
                raise exceptions.OptionsError(
                    "regcache: this mitmweb has no web_password option, so its UI must stay on 127.0.0.1 (web_host)"
                )
            if not ctx.options.web_password:
                raise exceptions.OptionsError(
                    f"regcache: mitmweb's UI on {ctx.options.web_host} needs a password: set REGCACHE_WEB_PASSWORD"
                )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Before the view's own requestheaders lists the flow: a ping never is.
        if self._view() is not None:
            label_flow(flow, *_labelled(flow))

    def request(self, flow: http.HTTPFlow) -> None:
        # UpstreamCredentials has just added our Authorization: off the list it goes, before
        # anything can show it (the view listed the flow at requestheaders, without it).
        if flow.metadata.get(INJECTED) and (view := self._view()) is not None:
            view.update([flow])

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # The request has gone, so its row can show it as the client sent it. Redacted by now
        # (UpstreamCredentials.responseheaders): listed again. Errors are listed again by the
        # view's own `error` hook, after ours redacted.
        if (view := self._view()) is not None:
            show_as_received(flow)
            view.update([flow])

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        if (view := self._view()) is not None:  # not `if view`: an empty view is falsy
            show_as_received(flow)  # for flows answered before any backend was asked
            label_flow(flow, *_labelled(flow), flow.metadata.get(RECORD))
            self._drop_sent_blobs(flow)
            if drop := finished_flows_beyond(view.resolve("@all"), view.store_count(), ctx.options.regcache_web_max_flows):
                view.remove(drop)

    def _drop_sent_blobs(self, flow: http.HTTPFlow) -> None:
        """A small blob the proxy answered from the cache's storage is in its flow, unlike a
        streamed one: kept, 2000 of them could hold 500 MB. Its body goes once it has been
        sent (the flow is no longer live), at the next flow's end."""
        if _sent_blob(flow):
            self._sent_blobs.append(flow)
        for sent in [f for f in self._sent_blobs if not f.live]:
            sent.response.content = None
            self._sent_blobs.remove(sent)

    @staticmethod
    def _view():
        """mitmweb's view (None elsewhere), with our filter around its own: again after each
        change of view_filter, which replaces it."""
        view = ctx.master.addons.get("view")
        if view is not None and not isinstance(view.filter, Unlisted):
            view.filter = Unlisted(view.filter)
        return view


def password_hash(password: str) -> str:
    """An argon2 hash for mitmweb's web_password; one given already hashed (`$...`) is kept."""
    if password.startswith("$"):
        return password
    import argon2  # mitmproxy's own dependency wherever mitmweb has web_password

    return argon2.PasswordHasher().hash(password)


def label_flow(flow: http.HTTPFlow, target: Target | None, upstream_fetch: bool, record: PullRecord | None = None) -> None:
    flow.comment = flow_label(target, upstream_fetch, record, streamed=BYTE_COUNTER in flow.metadata or _sent_blob(flow))
    if record is not None and (marker := flow_marker(record)):
        flow.marked = marker


def show_as_received(flow: http.HTTPFlow) -> None:
    """Make the flow's request read as it reached regcache: mitmweb's Path column is the request's
    URL (scheme, Host, port, path), and routing pointed it at a backend (a cache on loopback, or
    the placeholder `127.0.0.1:1` for what nobody routed). Only once the request has gone or
    was answered here: the backend got it as routing made it. Where it went stays in the flow's
    server connection. A cache's upstream fetch that went on keeps the upstream's URL: that is
    what it is about. Once per flow."""
    path = flow.metadata.pop(CLIENT_PATH, None)
    if path is None:
        return
    went_upstream = bool({EGRESS, REDIRECT} & flow.metadata.keys()) and ANSWERED_HERE not in flow.metadata
    if EGRESS_FOR in flow.metadata and went_upstream:
        return
    request = flow.request
    request.scheme = "https" if flow.client_conn.tls_established else "http"
    request.host, request.port = flow.client_conn.sockname[:2]
    request.path = path
    request.host_header = flow.metadata[CLIENT_HOST] or None  # after host and port: they set it too


def _sent_blob(flow: http.HTTPFlow) -> bool:
    """A blob the proxy answered itself, from the cache's storage."""
    target: Target | None = flow.metadata.get(TARGET)
    return ANSWERED_HERE in flow.metadata and target is not None and target.kind == "blob" and flow.response is not None


def _labelled(flow: http.HTTPFlow) -> tuple[Target | None, bool]:
    """What a flow's label names: its client request, or the upstream fetch of a cache."""
    if (egress := flow.metadata.get(EGRESS)) is not None:
        return egress, True
    return flow.metadata.get(TARGET), False
