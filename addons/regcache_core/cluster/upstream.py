"""UpstreamStatus (upstream/state.py) shared by the replicas: an upstream found down by one is
known down by all at once, and back likewise, so no other replica pays the deadline to find out.

Redis holds the upstreams known down (`regcache:upstreams-down`: registry -> upstream and reason),
and each change is published on `regcache:upstream`; every replica listens and takes it into
its own UpstreamState, which answers every question without a Redis call (the request path
asks it for each upstream exchange) and goes on alone while Redis is down. A change made while
Redis is down is sent when it is back; then the replica takes Redis's view again.

Every replica whose state says down probes the upstream itself, as one node does: a probe is one
`GET /v2/` every 5 s (no pull, nothing metered), so N replicas cost N of them, and no lease is
needed to make sure somebody probes when the replica that found the outage has gone. The first
probe answered brings the upstream back for the whole cluster.
"""

from __future__ import annotations

import asyncio
import contextlib

from redis.exceptions import RedisError

from ..upstream.state import UpstreamState
from .link import PROBE_INTERVAL, RedisLink, SharedStateDown

DOWN = "regcache:upstreams-down"
CHANNEL = "regcache:upstream"
LISTEN_TICK = 1.0  # seconds between looks at whether the link had an outage (then listen again)


class SharedUpstreamState:
    def __init__(self, link: RedisLink, own: UpstreamState, replica: str) -> None:
        self.link = link
        self.own = own
        self.replica = replica  # to tell its own messages
        self._upstreams: dict[str, str] = {}  # registry -> upstream base URL, as changes named them
        self._unsent: set[str] = set()  # registries whose change Redis has not been told
        self._hearing = False  # a change taken from another replica is not sent back
        self._sending: set[asyncio.Task] = set()
        own.on_change = self._changed
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    # UpstreamStatus: this replica's state, which the others keep told.

    def reason_down(self, registry: str) -> str | None:
        return self.own.reason_down(registry)

    def went_down(self, registry: str, upstream: str, reason: str) -> None:
        self.own.went_down(registry, upstream, reason)

    def answered(self, registry: str, upstream: str) -> None:
        self.own.answered(registry, upstream)

    def states(self, registries: list[str]) -> dict[str, str]:
        return self.own.states(registries)

    def close(self) -> None:
        """Stop listening. The UpstreamState is its owner's (Services) and goes on alone."""
        self._listener.cancel()
        for sending in self._sending:
            sending.cancel()
        self.own.on_change = lambda registry, upstream, reason: None

    def _changed(self, registry: str, upstream: str, reason: str | None) -> None:
        self._upstreams[registry] = upstream
        if self._hearing:
            return
        sending = asyncio.get_running_loop().create_task(self._send(registry))
        self._sending.add(sending)
        sending.add_done_callback(self._sending.discard)

    async def _send(self, registry: str) -> None:
        """Tell Redis and the replicas this replica's state of `registry` as it is now (so that
        sends racing each other all say the latest)."""
        reason = self.own.reason_down(registry)
        upstream = self._upstreams[registry]

        async def send(r) -> None:
            async with r.pipeline(transaction=True) as pipe:
                if reason is None:
                    pipe.hdel(DOWN, registry)
                else:
                    pipe.hset(DOWN, registry, f"{upstream}\t{reason}")
                pipe.publish(CHANNEL, "\t".join((self.replica, registry, upstream, reason or "")))
                await pipe.execute()

        try:
            await self.link.call(send)
        except SharedStateDown:
            self._unsent.add(registry)
        else:
            self._unsent.discard(registry)

    def _hear(self, registry: str, upstream: str, reason: str | None) -> None:
        """Another replica's view of `registry`'s upstream (or Redis's) becomes this one's."""
        self._hearing = True
        try:
            if reason is not None and self.own.reason_down(registry) is None:
                self.own.went_down(registry, upstream, reason)
            elif reason is None and self.own.reason_down(registry) is not None:
                self.own.answered(registry, upstream)
        finally:
            self._hearing = False

    async def _listen(self) -> None:
        while True:
            pubsub = self.link.client.pubsub(ignore_subscribe_messages=True)
            outages = self.link.outages
            try:
                await self.link.call(lambda r: pubsub.subscribe(CHANNEL))
                await self._take_shared_view()
                while self.link.outages == outages:
                    message = await pubsub.get_message(timeout=LISTEN_TICK)
                    if message is not None:
                        sender, registry, upstream, reason = message["data"].decode().split("\t")
                        if sender != self.replica:
                            self._hear(registry, upstream, reason or None)
            except (SharedStateDown, RedisError, OSError, ValueError):
                pass  # listen again once the link is up: what was missed meanwhile is read then
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(PROBE_INTERVAL)
            while not self.link.up:
                await asyncio.sleep(PROBE_INTERVAL)

    async def _take_shared_view(self) -> None:
        """Send what changed here while Redis was away, then take Redis's view."""
        for registry in list(self._unsent):
            await self._send(registry)
        down = {name.decode(): value.decode().split("\t", 1)
                for name, value in (await self.link.call(lambda r: r.hgetall(DOWN))).items()}
        for registry, (upstream, reason) in down.items():
            self._upstreams.setdefault(registry, upstream)
            self._hear(registry, upstream, reason)
        for registry, upstream in list(self._upstreams.items()):
            if registry not in down and registry not in self._unsent:
                self._hear(registry, upstream, None)
