"""What one client may hold of the proxy: open connections per client address (capped), and a
deadline for each connection's next whole request head, counted from connect or from the end of
its last exchange, and not running while a request of it is in flight.

mitmproxy sees a request only once its head is complete (then `requestheaders`), and bounds
neither how long a head may take (its idle timer restarts with every byte) nor how big it may
grow, so a client trickling bytes holds a connection, and its memory, for as long as it likes.
The deadline closes it. Plain Python: the addon (mitm/client_limits.py) applies the answers.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class _Connection:
    address: str
    head_due: float | None  # None while a request of it is in flight
    in_flight: int = 0  # requests (HTTP/2 streams) between their head and their end


class ClientLimits:
    def __init__(self, max_per_address: int, head_timeout: float, clock=time.monotonic) -> None:
        self.max_per_address = max_per_address
        self.head_timeout = head_timeout
        self._clock = clock
        self._connections: dict[Hashable, _Connection] = {}
        self._per_address: Counter[str] = Counter()

    def admit(self, connection: Hashable, address: str) -> bool:
        """False when `address` holds its maximum already: refuse the connection."""
        if self._per_address[address] >= self.max_per_address:
            return False
        self._per_address[address] += 1
        self._connections[connection] = _Connection(address, self._clock() + self.head_timeout)
        return True

    def closed(self, connection: Hashable) -> None:
        if (known := self._connections.pop(connection, None)) is not None:
            self._per_address[known.address] -= 1
            if not self._per_address[known.address]:
                del self._per_address[known.address]

    def head_arrived(self, connection: Hashable) -> None:
        if (known := self._connections.get(connection)) is not None:
            known.in_flight += 1
            known.head_due = None

    def exchange_ended(self, connection: Hashable) -> None:
        if (known := self._connections.get(connection)) is not None and known.in_flight:
            known.in_flight -= 1
            if not known.in_flight:
                known.head_due = self._clock() + self.head_timeout

    def overdue(self) -> list[Hashable]:
        """Connections whose next request head is late: close them. Each is listed once."""
        now = self._clock()
        late = [c for c, known in self._connections.items() if known.head_due is not None and known.head_due <= now]
        for connection in late:
            self._connections[connection].head_due = None
        return late
