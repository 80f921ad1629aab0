"""The replay rule stated as sets, for differential tests of the bitmap windows.

Both the Python window (kubespan_dp.replay) and the C one (_fastpath) are checked
against it. Its constants come from the protocol, not from the code under test.
"""

from __future__ import annotations

REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1  # no keypair may get this far
WINDOW = 8128  # a counter this far below the newest is still accepted, one further is not


class ReplayModel:
    """Accept each counter once, and none more than WINDOW below the newest."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.last = 0

    def check(self, n: int) -> bool:
        if n >= REJECT_AFTER_MESSAGES or n in self.seen:
            return False
        return n > self.last or self.last - n <= WINDOW

    def update(self, n: int) -> bool:
        ok = self.check(n)
        if ok:
            self.seen.add(n)
            self.last = max(self.last, n)
        return ok
