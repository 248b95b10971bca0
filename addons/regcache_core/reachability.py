"""Whether one dependency can be reached: the mechanics Redis (cluster/link.py), the object store
(objectstore/health.py) and each upstream (upstream/state.py) share.

A dependency goes down when one of this process's exchanges with it fails (`failed`). While it
is down its callers read `reason` and fail fast instead of waiting on it, and one background
probe asks it again every `every` seconds; the first probe answered, or any answer an exchange
gets (`answered`), brings it back. `on_down(reason)` and `on_back()` run once per change each
way: the owner's warning line, gauge and messages. What a probe is, and the words, are the
owner's.

What another process says (a replica that found an upstream down, or back) is a hint, never the
state itself, since its network is not this one's: `told_down` makes callers skip waiting (they
read `hint`) while one probe of this process's own checks it, whose failure takes the dependency
down here and whose answer clears the hint; `told_up` makes a down dependency's probe ask at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


def exception_text(error: BaseException) -> str:
    return str(error) or type(error).__name__


class Reachability:
    def __init__(self, probe: Callable[[], Awaitable[None]], every: float, on_down: Callable[[str], None],
                 on_back: Callable[[], None], why: Callable[[BaseException], str] = exception_text) -> None:
        self._probe = probe  # returns once the dependency answers; raises why not (with its own deadline)
        self.every = every
        self._on_down = on_down
        self._on_back = on_back
        self._why = why  # a probe's failure, in the owner's words
        self.reason: str | None = None  # why it is down, as this process found; None while up
        self.hint: str | None = None  # what another said, while this process's probe checks it
        self._probing: asyncio.Task | None = None
        self._ask_now = asyncio.Event()

    @property
    def up(self) -> bool:
        return self.reason is None

    def failed(self, reason: str) -> None:
        """An exchange of this process's got no answer it can use: down (said the first time)."""
        self.hint = None
        first = self.reason is None
        self.reason = reason
        if first:
            self._on_down(reason)
            self._keep_probing(at_once=False)

    def answered(self) -> None:
        """An exchange of this process's got an answer: up (said if it was down)."""
        was_down = self.reason is not None
        self.reason = self.hint = None
        if self._probing is not None and self._probing is not asyncio.current_task():
            self._probing.cancel()
        self._probing = None
        if was_down:
            self._on_back()

    def told_down(self, hint: str) -> None:
        """Another found it down: skip waiting on it while one probe checks it from here."""
        if self.reason is None and self.hint is None:
            self.hint = hint
            self._keep_probing(at_once=True)

    def told_up(self) -> None:
        """Another found it back: if it is down here, the probe asks now rather than at its time."""
        if self.reason is not None:
            self._ask_now.set()

    def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
            self._probing = None

    def _keep_probing(self, at_once: bool) -> None:
        if self._probing is None:
            self._probing = asyncio.get_running_loop().create_task(self._probe_until_answered(at_once))

    async def _probe_until_answered(self, at_once: bool) -> None:
        while True:
            if not at_once:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.every):
                        await self._ask_now.wait()
            at_once = False
            self._ask_now.clear()
            try:
                await self._probe()
            except Exception as e:  # noqa: BLE001 - any failure means: not reachable from here
                self.failed(self._why(e))
            else:
                self.answered()
                return
