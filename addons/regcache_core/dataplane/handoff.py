"""Which client blob GETs the proxy hands to the data plane, and the URL it sends them to; which
small warm blobs it answers itself; which blobs its cache does not hold (cold: their GETs follow
the proxy's download, mitm/cold_blobs.py)."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from ..config import Config, DataPlane
from ..routing import Target, strip_port
from .file_response import blob_headers
from .grants import GrantSigner
from .storage import warm_blob

_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.?")


class Cold:
    """The cache does not hold the blob for that repository."""


COLD = Cold()


@dataclass(frozen=True)
class SmallBlob:
    """A warm blob under REGCACHE_DATAPLANE_MIN_SIZE, read whole: the proxy answers it itself,
    as registry:2 would (a redirect would cost more than the bytes, and asking the cache costs
    another hop)."""

    body: bytes
    headers: dict[str, str]


def warm_blob_answer(config: Config, signer: GrantSigner, target: Target, host: str,
                     conditional: bool) -> str | SmallBlob | Cold | None:
    """How the proxy answers a client's GET of the blob `target`, asked for at Host `host`: the
    data-plane URL to redirect to; a SmallBlob; COLD when the cache does not hold it for that
    repository; or None, when it goes to the cache as it came (the data plane is off, the
    registry's storage is unknown, or the blob is small and the request `conditional` or a
    Range, which the cache answers). Blocking (file system): call it in a thread."""
    dataplane, storage = config.dataplane, target.registry.storage
    if dataplane is None or storage is None or target.kind != "blob":
        return None
    path = warm_blob(storage, target.repository, target.reference)
    if path is None:
        return COLD
    try:
        with open(path, "rb") as file:
            status = os.fstat(file.fileno())
            if status.st_size < dataplane.min_size:
                if conditional:
                    return None
                body = file.read(status.st_size + 1)
                if len(body) != status.st_size:
                    return None  # cut short under us: the cache decides
                return SmallBlob(body, blob_headers(target.reference, status.st_mtime)
                                 | {"Content-Type": "application/octet-stream"})
    except OSError:
        return None  # evicted just now
    base = client_url_base(dataplane, host)
    if base is None:
        return None
    return signer.url(base, signer.grant("blob", target.registry.name, target.repository, target.reference, status.st_size))


def client_url_base(dataplane: DataPlane, host: str) -> str | None:
    """Where the data-plane URLs given to a client that asked at Host `host` lead: to
    REGCACHE_DATAPLANE_URL, or the host name it used; None for a Host that is no host name."""
    return dataplane.url or client_base_url(host, dataplane.port)


def client_base_url(host: str, port: int) -> str | None:
    """`http://<the host name the client used>:<port>`, spelled as the client spelled it (a
    virtual host, an IP address, IPv6 in brackets); None for a Host that is neither."""
    name = strip_port(host)
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        return f"http://[{name}]:{port}"
    return f"http://{name}:{port}" if _HOST_NAME.fullmatch(name) else None
