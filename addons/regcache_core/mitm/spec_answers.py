"""SpecAnswers: applies spec_answers.py to what caches answer, before the pull log and metrics
see the answer, and names the registry of an answer to a request routed by `?ns=`."""

from __future__ import annotations

import asyncio

from mitmproxy import http

from ..spec_answers import missing_manifest, tags_page
from .flow_notes import note
from .answers import refuse


MAX_TAGS_LIST = 16 << 20  # bytes of a cache's tags list held whole to cut a page from; larger ones pass unpaged


class SpecAnswers:
    """Replaces answers of a client request's backend where registry:2 differs from the spec."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        name_the_namespace(flow)  # a streamed answer's head is sent before `response`
        target = note(flow).target
        if target is not None and target.page is not None and flow.response.status_code == 200:
            length = flow.response.headers.get("Content-Length", "")
            if not length.isdigit() or int(length) <= MAX_TAGS_LIST:
                flow.response.stream = False  # the page is cut from the whole body

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._spec_answer(flow)
        name_the_namespace(flow)  # on the answer as sent: regcache's own, a 307, a replaced one

    async def _spec_answer(self, flow: http.HTTPFlow) -> None:
        target = note(flow).target
        if target is None or note(flow).upstream_request is not None or flow.response.stream:
            return
        response = flow.response
        head = flow.request.method == "HEAD"
        body = None if head else response.get_content(strict=False)
        if refusal := missing_manifest(target, response.status_code, body, response.headers.get("Content-Length")):
            refuse(flow, refusal)
        elif target.page is not None and response.status_code == 200 and not head:
            # A long list takes a while to parse: not on the event loop.
            if (page := await asyncio.to_thread(tags_page, target.page, body)) is not None:
                response.headers.pop("Content-Encoding", None)
                response.content, link = page
                if link:
                    response.headers["Link"] = link


def name_the_namespace(flow: http.HTTPFlow) -> None:
    """The distribution spec's Registry Proxying: a registry serving `?ns=` says which namespace it
    answered for in `OCI-Namespace`. Only for requests routed by `ns`: by Host, the name says it."""
    target = note(flow).target
    if target is not None and target.by_ns and flow.response is not None:
        flow.response.headers["OCI-Namespace"] = target.registry.name
