"""How the proxy answers a client's GET of a blob whose cache keeps it in an object store: a 307
to a presigned URL of the object (REGCACHE_S3_REDIRECT) or to the data plane, which streams it
from the store; a small one with its bytes; COLD when the cache does not hold it."""

from __future__ import annotations

from ..config import Config
from ..dataplane.file_response import blob_headers
from ..dataplane.grants import GrantSigner
from ..dataplane.handoff import COLD, Cold, SmallBlob, client_url_base
from ..routing import Target
from .blobs import StoredBlobs


async def warm_object_answer(config: Config, blobs: StoredBlobs, signer: GrantSigner | None, target: Target,
                             host: str, conditional: bool) -> str | SmallBlob | Cold | None:
    """The URL to redirect to, a SmallBlob, COLD, or None when the cache answers as it would (a
    small blob asked with Range or a condition; neither presigned URLs nor the data plane on).
    Raises StoreUnreachable when the store does not answer, StoreRefused when it refuses."""
    store, dataplane = target.registry.object_store, config.dataplane
    if not config.s3.redirect and signer is None:
        return None
    blob = await blobs.warm(store, target.repository, target.reference)
    if blob is None:
        return COLD
    if dataplane is not None and blob.size < dataplane.min_size:
        if conditional:
            return None
        body = await blobs.read(store, blob)
        if body is None:
            return None  # evicted just now: the cache decides
        return SmallBlob(body, blob_headers(target.reference, blob.mtime) | {"Content-Type": "application/octet-stream"})
    if config.s3.redirect:
        return await blobs.presigned_url(store, blob)
    base = client_url_base(dataplane, host)
    if base is None:
        return None
    return signer.url(base, signer.grant("blob", target.registry.name, target.repository, target.reference, blob.size))
