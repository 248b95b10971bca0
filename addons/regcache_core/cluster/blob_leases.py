"""Leases on cold blobs, in the Redis replicas share: which replica downloads a cold blob for the
cluster, and where the others send that blob's requests.

A replica whose requests find a blob cold (neither in the shared storage nor spooled here) asks
for its lease: a key set if absent with an expiry (LEASE_TTL), whose value names the taker (a
token of this process) and its data plane's base URL (REGCACHE_DATAPLANE_URL). The taker leads:
it downloads the blob into its spool as one node does (spool/), renews the lease every
RENEW_EVERY seconds while the spool serves, publishes the spool's size and type once its download
has the upstream's 200 (so other replicas can sign a grant for it), and deletes the lease when the
spool goes. Every other replica waits until the size is published and sends the blob's requests
to the leader's data plane. A leader that dies stops renewing: its lease expires within LEASE_TTL
and the next request for the blob, on any replica, takes it over.

Only the taker renews, publishes or releases, each only while the lease holds the value it wrote
(lease.py), so a leader whose lease expired (paused, cut from Redis) never overwrites its
successor's. Redis trouble is the link's (link.py): SharedStateDown, and the caller goes on with
its own spools.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from ..spool.blob_heads import BlobHead
from .lease import HeldLease, delete_unchanged, take
from .link import RedisLink

LEASE_TTL = 5.0  # seconds a lease outlives its leader's last renewal
RENEW_EVERY = 1.5  # seconds between renewals: a few chances before the lease expires
KEY_PREFIX = "regcache:blob-lease:"
HEAD_PREFIX = "regcache:blob-head:"

Key = tuple[str, str, str]  # registry name, repository, digest, as spools' (spool/table.py)


@dataclass(frozen=True)
class Leader:
    """What a lease's value says: who leads, where its data plane is, and the blob's size and type
    once its download has them (None before)."""

    owner: str
    dataplane: str  # base URL, http://host:port
    size: int | None = None
    content_type: str | None = None
    raw: bytes = field(default=b"", compare=False)  # the value as read, for `evict`

    def value(self) -> str:
        return json.dumps({"owner": self.owner, "dataplane": self.dataplane, "size": self.size,
                           "type": self.content_type}, sort_keys=True)

    @classmethod
    def parse(cls, value: bytes | None) -> Leader | None:
        if value is None:
            return None
        try:
            fields = json.loads(value)
            size = fields.get("size")
            return cls(str(fields["owner"]), str(fields["dataplane"]), size if isinstance(size, int) else None,
                       fields.get("type"), value)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # not a value regcache wrote: nobody's


class BlobLeases:
    def __init__(self, link: RedisLink, dataplane: str, ttl: float = LEASE_TTL) -> None:
        self.link = link
        self.me = Leader(secrets.token_hex(8), dataplane)
        self.ttl = ttl

    async def take(self, key: Key) -> HeldLease | Leader | None:
        """The lease on `key` if it was free (this replica leads), else the leader's value; None
        when the lease went between the two looks (ask again). Raises SharedStateDown."""
        taken = await take(self.link, lease_name(key), self.me.value(), self.ttl)
        return taken if isinstance(taken, HeldLease) else Leader.parse(taken)

    async def leader(self, key: Key) -> Leader | None:
        """Who leads `key` now, if anyone. Raises SharedStateDown."""
        return Leader.parse(await self.link.call(lambda r: r.get(lease_name(key))))

    async def publish(self, lease: HeldLease, size: int, content_type: str) -> bool:
        """Tell the others the spool's size and type (they sign grants with them); whether the lease
        is still ours."""
        return await lease.replace(Leader(self.me.owner, self.me.dataplane, size, content_type).value())

    async def evict(self, key: Key, leader: Leader) -> None:
        """Delete another replica's lease, found unreachable, unless it changed since it was read."""
        await delete_unchanged(self.link, lease_name(key), leader.raw)

    async def known_head(self, key: Key) -> tuple[Leader | None, BlobHead | None]:
        """Who leads `key`, and the upstream's 200 to a HEAD of it that a replica shared lately, in
        one round trip. Raises SharedStateDown."""
        lease, head = await self.link.call(lambda r: r.mget(lease_name(key), head_name(key)))
        return Leader.parse(lease), _parse_head(key[2], head)

    async def share_head(self, key: Key, head: BlobHead, known_for: float) -> None:
        """The upstream's 200 to a HEAD of `key`, for every replica for `known_for` seconds."""
        value = json.dumps({"size": head.size, "type": head.content_type})
        await self.link.call(lambda r: r.set(head_name(key), value, px=int(known_for * 1000)))

    def mine(self, leader: Leader) -> bool:
        return leader.owner == self.me.owner


def _parse_head(digest: str, value: bytes | None) -> BlobHead | None:
    if value is None:
        return None
    try:
        fields = json.loads(value)
        return BlobHead(digest, int(fields["size"]), str(fields["type"]))
    except (ValueError, KeyError, TypeError):
        return None


def lease_name(key: Key) -> str:
    registry, repository, digest = key
    return f"{KEY_PREFIX}{registry}/{repository}@{digest}"


def head_name(key: Key) -> str:
    registry, repository, digest = key
    return f"{HEAD_PREFIX}{registry}/{repository}@{digest}"
