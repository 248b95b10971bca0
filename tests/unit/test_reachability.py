"""The down/probe/back tracker (reachability.py) on its own: one change said each way, the probe
bringing it back, and another's word a hint checked by a probe of one's own."""

from __future__ import annotations

import asyncio

from regcache_core.reachability import Reachability


class Dependency:
    """A dependency whose probe answers while `reachable`, and what its tracker said."""

    def __init__(self, every: float = 3600) -> None:
        self.reachable = True
        self.probes = 0
        self.said: list[str] = []
        self.tracker = Reachability(self.probe, every, lambda reason: self.said.append(f"down: {reason}"),
                                    lambda: self.said.append("back"))

    async def probe(self) -> None:
        self.probes += 1
        if not self.reachable:
            raise ConnectionRefusedError("refused")


async def eventually(check) -> bool:
    for _ in range(500):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


def test_down_once_probed_back_once():
    async def run():
        dependency = Dependency(every=0.01)
        dependency.reachable = False
        for reason in ("timeout", "refused"):
            dependency.tracker.failed(reason)
        down = (dependency.tracker.up, dependency.tracker.reason)
        probed = await eventually(lambda: dependency.probes >= 2)
        dependency.reachable = True
        back = await eventually(lambda: dependency.tracker.up)
        return down, probed, back, dependency.said

    assert asyncio.run(run()) == ((False, "refused"), True, True, ["down: timeout", "back"])


def test_a_hint_is_checked_by_one_probe_and_says_nothing_when_it_answers():
    async def run():
        dependency = Dependency()
        dependency.tracker.told_down("refused at another replica")
        dependency.tracker.told_down("timeout at another replica")  # checking already
        hinted = (dependency.tracker.up, dependency.tracker.hint)
        checked = await eventually(lambda: dependency.tracker.hint is None)
        return hinted, checked, dependency.probes, dependency.said

    assert asyncio.run(run()) == ((True, "refused at another replica"), True, 1, [])


def test_a_hint_whose_probe_fails_takes_it_down_here_and_told_up_probes_at_once():
    async def run():
        dependency = Dependency()
        dependency.reachable = False
        dependency.tracker.told_down("refused at another replica")
        down = await eventually(lambda: dependency.tracker.reason is not None)
        dependency.tracker.told_up()  # another is back; not here: still down
        asked = await eventually(lambda: dependency.probes == 2)
        still_down = dependency.tracker.reason
        dependency.reachable = True
        dependency.tracker.told_up()
        back = await eventually(lambda: dependency.tracker.up)
        dependency.tracker.close()
        return down, asked, still_down, back, dependency.said

    assert asyncio.run(run()) == (True, True, "refused", True, ["down: refused", "back"])
