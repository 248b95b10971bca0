"""Which client blob GETs the proxy hands to the data plane, and the URL it sends them to."""

from __future__ import annotations

import ipaddress
import re

from ..config import Config
from ..routing import Target, strip_port
from .grants import GRANT_PATHS, GrantSigner
from .storage import warm_blob

_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.?")


def handoff_location(config: Config, signer: GrantSigner, target: Target, host: str) -> str | None:
    """The data-plane URL for a client's GET of the blob `target`, asked for at Host `host`;
    None when it keeps streaming through the proxy: the data plane is off, the registry's
    storage is unknown, the blob is not warm for that repository, or it is under
    REGCACHE_DATAPLANE_MIN_SIZE. Blocking (file system): call it in a thread."""
    dataplane, storage = config.dataplane, target.registry.storage
    if dataplane is None or storage is None or target.kind != "blob":
        return None
    base = dataplane.url or client_base_url(host, dataplane.port)
    path = base and warm_blob(storage, target.repository, target.reference)
    if not path:
        return None
    try:
        size = path.stat().st_size
    except OSError:
        return None  # evicted just now
    if size < dataplane.min_size:
        return None
    grant = signer.grant("blob", target.registry.name, target.repository, target.reference, size)
    return f"{base}{GRANT_PATHS['blob']}?{signer.query(grant)}"


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
