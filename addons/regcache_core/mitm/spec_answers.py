"""SpecAnswers: applies spec_answers.py to what caches answer, before the pull log and metrics
see the answer."""

from __future__ import annotations

from mitmproxy import http

from ..routing import Target
from ..spec_answers import missing_manifest
from .keys import TARGET, UPSTREAM
from .router import refuse


class SpecAnswers:
    """Replaces answers of a client request's backend where registry:2 differs from the spec."""

    def response(self, flow: http.HTTPFlow) -> None:
        target: Target | None = flow.metadata.get(TARGET)
        if target is None or UPSTREAM in flow.metadata or flow.response.stream:
            return
        response = flow.response
        body = None if flow.request.method == "HEAD" else response.raw_content
        if refusal := missing_manifest(target, response.status_code, body, response.headers.get("Content-Length")):
            refuse(flow, refusal)
