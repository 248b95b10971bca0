"""UpstreamStatus (upstream/state.py) shared by the replicas: an upstream found down by one is
skipped by the others at once, so no other replica pays the deadline to find out, but each
replica's own network decides whether it is down there.

Redis holds the upstreams found down (`regcache:upstreams-down`: registry -> upstream and reason,
written by the last replica whose own state of it changed), and each replica publishes its own
changes on `regcache:upstream`. What a replica hears is a hint, never its state
(reachability.py): told "down", it skips the upstream (serving what its cache holds) while one
probe of its own (`GET /v2/`, bounded like every upstream exchange) checks; the probe's failure
makes the upstream down on this replica too (its own warning, gauge and message), its answer
ends the hint and nothing is said. Told "back", a replica that has it down probes at once. So a
replica whose own route to the upstream is cut keeps it down for itself, while the others,
whose probes answer, keep pulling from it: no flapping, and the others pay one probe per change
of the cut replica's state.

Every replica whose state says down probes the upstream every 5 s, as one node does: N replicas
cost N probes (no pull, nothing metered), and no lease is needed to make sure somebody probes
when the replica that found the outage has gone. While Redis is down each replica goes on alone;
a change made meanwhile is sent when it is back, then Redis's view is taken as hints.
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
        sending = asyncio.get_running_loop().create_task(self._send(registry))
        self._sending.add(sending)
        sending.add_done_callback(self._sending.discard)

    async def _send(self, registry: str) -> None:
        """Tell Redis and the replicas this replica's state of `registry` as it is now (so that
        sends racing each other all say the latest)."""
        reason = self.own.found_down(registry)
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
        """Another replica's view of `registry`'s upstream (or Redis's): a hint this one checks."""
        if reason is None:
            self.own.told_up(registry, upstream)
        else:
            self.own.told_down(registry, upstream, f"{reason} at another replica")

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
