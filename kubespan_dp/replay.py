"""Anti-replay window for transport-data counters (RFC 6479).

The window is a ring of 128 blocks of 64 bits (8192 bits). The block that
holds the newest counter is always in use, so only 127 whole blocks are
guaranteed to lie behind it: a counter up to WINDOW_SIZE = 8128 below the
newest one can still be accepted, anything older is refused. Moving the window
forward clears the blocks it passes over, so no bit is ever cleared one by one.

The semantics follow wireguard-go's ``replay.Filter`` exactly, with the counter
limit fixed at REJECT_AFTER_MESSAGES: counters at or above it are refused
because the sender must never get that far on one keypair.

Only call :meth:`ReplayWindow.update` after the packet's AEAD tag verified;
otherwise a forged packet could push the window forward and make genuine
packets look too old.
"""

from __future__ import annotations

# one source with the C fast path (setup.py generates its header from constants.py)
from .constants import BLOCK_BITS as BLOCK_BITS  # 64 bits per block
from .constants import REJECT_AFTER_MESSAGES as REJECT_AFTER_MESSAGES
from .constants import RING_BLOCKS as RING_BLOCKS  # 128 blocks, 8192 bits in all
from .constants import WINDOW_SIZE as WINDOW_SIZE  # 8128

BLOCK_BIT_LOG = BLOCK_BITS.bit_length() - 1  # 6
BLOCK_MASK = RING_BLOCKS - 1
BIT_MASK = BLOCK_BITS - 1


class ReplayWindow:
    """Remembers which receive counters of one keypair were already accepted."""

    __slots__ = ("_last", "_ring", "limit")

    def __init__(self, limit: int = REJECT_AFTER_MESSAGES) -> None:
        self.limit = limit
        self._last = 0
        self._ring = [0] * RING_BLOCKS

    def reset(self) -> None:
        self._last = 0
        self._ring = [0] * RING_BLOCKS

    @property
    def last(self) -> int:
        """The greatest counter accepted so far (0 when none was)."""
        return self._last

    def state(self) -> tuple[int, tuple[int, ...]]:
        """(last, the 128 blocks): everything a copy needs (the C window's layout)."""
        return self._last, tuple(self._ring)

    def check(self, counter: int) -> bool:
        """Whether ``update(counter)`` would accept; changes nothing.

        Used before decryption to skip work for obvious replays.
        """
        if counter < 0 or counter >= self.limit:
            return False
        if counter > self._last:
            # Bits above the newest counter are clear: their block was wiped
            # when the window entered it, or will be wiped on the way there.
            return True
        if self._last - counter > WINDOW_SIZE:
            return False
        block = (counter >> BLOCK_BIT_LOG) & BLOCK_MASK
        return not (self._ring[block] >> (counter & BIT_MASK)) & 1

    def update(self, counter: int) -> bool:
        """Accept ``counter`` and record it; False if it is a replay or too old."""
        if counter < 0 or counter >= self.limit:
            return False
        ring = self._ring
        index_block = counter >> BLOCK_BIT_LOG
        if counter > self._last:
            current = self._last >> BLOCK_BIT_LOG
            # Clearing more than the whole ring is pointless, so cap the distance.
            diff = min(index_block - current, RING_BLOCKS)
            for i in range(current + 1, current + diff + 1):
                ring[i & BLOCK_MASK] = 0
            self._last = counter
        elif self._last - counter > WINDOW_SIZE:
            return False
        index_block &= BLOCK_MASK
        bit = 1 << (counter & BIT_MASK)
        old = ring[index_block]
        if old & bit:
            return False
        ring[index_block] = old | bit
        return True
