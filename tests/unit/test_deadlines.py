"""Keys held until a deadline (deadlines.py): a key holds until the time last set for it, and
dropping the expired ones leaves the others, however the keys were set again."""

from __future__ import annotations

from regcache_core.deadlines import Deadlines


def test_expired_keys_go_and_a_key_set_again_holds_until_its_new_deadline():
    deadlines = Deadlines()
    deadlines.set("a", 1.0)
    deadlines.set("b", 2.0)
    deadlines.set("a", 3.0)  # set again: now the latest
    deadlines.set("c", 4.0)
    deadlines.drop_expired(2.0)
    assert list(deadlines) == ["a", "c"]
    assert (deadlines.until("a"), deadlines.until("b"), deadlines.until("c")) == (3.0, 0.0, 4.0)
    deadlines.drop_expired(3.5)
    assert list(deadlines) == ["c"]
    deadlines.clear()
    assert list(deadlines) == [] and deadlines.until("c") == 0.0
