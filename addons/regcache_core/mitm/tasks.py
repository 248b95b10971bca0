"""ScheduledTasks: mitmproxy's tasks are scheduled, not run eagerly, on every Python.

On Python 3.12+ mitmproxy switches its event loop to eager tasks (asyncio.eager_task_factory):
a hook's task then starts inside mitmproxy's per-connection event lock and waits for it, and a
connection's reader waits behind it. When that hook's result closes the connection (a killed
flow: a refused upload whose body is still coming), the reader is cancelled inside that wait,
and mitmproxy never closes its socket: the client hangs and the file descriptor stays open
(seen with mitmproxy 11.0.2 and 12.3.1 on Python 3.12). With scheduled tasks, as on Python
3.11, nothing waits on that lock.
"""

from __future__ import annotations

import asyncio


class ScheduledTasks:
    def running(self) -> None:
        # mitmproxy calls `running` right after opening its listeners.
        asyncio.get_running_loop().set_task_factory(None)
