"""ManifestResponder: answers cached registries' manifest requests in front of the cache, and
learns tags and manifests from the cache's answers (the plain code is manifests/front.py, the
services' `manifests`)."""

from __future__ import annotations

from mitmproxy import http

from ..manifests.front import Plan
from ..routing import Target
from .answers import Answer, refuse
from .flow_notes import AnsweredBy, note
from .router import send_to
from .services import Services


class ManifestResponder:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def answer(self, flow: http.HTTPFlow) -> Answer | None:
        """A cached registry's manifest from memory; a tag whose digest is known is asked of the
        cache by that digest (then None: the cache answers)."""
        target = _cached_manifest(flow)
        if target is None:
            return None
        plan = await self.services.manifests.plan(target.registry, target.repository, target.reference,
                                                  flow.request.headers.get_all("Accept"))
        if plan is None:
            return None
        note(flow).cache = plan.cache
        if plan.manifest is None:
            note(flow).answered_by = AnsweredBy.CACHE_BY_DIGEST
            send_to(flow.request, target.backend, f"/v2/{target.repository}/manifests/{plan.digest}")
            return None
        return Answer(answer_from_memory(plan, flow.request.method))

    def response(self, flow: http.HTTPFlow) -> None:
        target = _cached_manifest(flow)
        if target is None or note(flow).answered_by is not AnsweredBy.BACKEND:
            return  # answered from what regcache knows
        response = flow.response
        if response.status_code == 200:
            # The raw bytes: learn() keeps them only if they hash to the digest.
            body = None if flow.request.method == "HEAD" else response.raw_content
            self.services.manifests.learn(target.registry, target.repository, target.reference, response.headers, body)
        elif refusal := self.services.manifests.outage_answer(target.registry, target.reference, response.status_code):
            refuse(flow, refusal)
        self.services.manifests.answered(target.registry, target.repository, target.reference)

    def error(self, flow: http.HTTPFlow) -> None:
        target = _cached_manifest(flow)
        if target is not None and note(flow).answered_by is AnsweredBy.BACKEND and self.services.manifests is not None:
            self.services.manifests.answered(target.registry, target.repository, target.reference)


def answer_from_memory(plan: Plan, method: str) -> http.Response:
    headers = dict(plan.manifest.headers)
    response = http.Response.make(200, b"" if method == "HEAD" else plan.manifest.body, headers)
    if method == "HEAD":  # what a GET would send, without the body
        response.headers["Content-Length"] = str(len(plan.manifest.body))
    return response


def _cached_manifest(flow: http.HTTPFlow) -> Target | None:
    target = note(flow).target
    if target is None or target.registry.cache is None or target.kind != "manifest":
        return None
    return target
