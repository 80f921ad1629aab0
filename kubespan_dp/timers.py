"""Per-peer timers of WireGuard, as deadlines (wireguard-go timers.go, kernel timers.c).

Five timers, each either unset (None) or a deadline in the caller's clock:

  retransmit_handshake  resend an initiation that got no response (5 s + jitter);
                        give up after MAX_TIMER_HANDSHAKES retries
  send_keepalive        answer received data with a keepalive if we sent
                        nothing back within KEEPALIVE_TIMEOUT (10 s)
  new_handshake         we sent data but heard nothing for 15 s (+ jitter):
                        start a new handshake
  zero_key_material     forget all keys 3 x REJECT_AFTER_TIME after the last
                        session was derived
  persistent_keepalive  the user's keepalive interval since any traffic

The ``on_*`` hooks are the events wireguard-go calls the timers from; the core
calls them at the same points and runs the handlers of expired timers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

# one source with the C fast path (setup.py generates its header from constants.py)
from .constants import KEEPALIVE_TIMEOUT as KEEPALIVE_TIMEOUT
from .constants import REJECT_AFTER_MESSAGES as REJECT_AFTER_MESSAGES
from .constants import REJECT_AFTER_TIME as REJECT_AFTER_TIME
from .constants import REKEY_AFTER_MESSAGES as REKEY_AFTER_MESSAGES
from .constants import REKEY_AFTER_TIME as REKEY_AFTER_TIME
from .constants import REKEY_ATTEMPT_TIME as REKEY_ATTEMPT_TIME
from .constants import REKEY_TIMEOUT as REKEY_TIMEOUT

MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18
REKEY_TIMEOUT_JITTER_MAX_MS = 334


class Timer(enum.Enum):
    """The five timers; each value names the ``Timers`` field holding its deadline."""

    RETRANSMIT_HANDSHAKE = "retransmit_handshake"
    SEND_KEEPALIVE = "send_keepalive"
    NEW_HANDSHAKE = "new_handshake"
    ZERO_KEY_MATERIAL = "zero_key_material"
    PERSISTENT_KEEPALIVE = "persistent_keepalive"


def jitter_from(rng: Callable[[int], bytes]) -> Callable[[], float]:
    """0-333 ms of random jitter, like wireguard-go's fastrandn(334) milliseconds."""
    return lambda: (int.from_bytes(rng(4), "little") % REKEY_TIMEOUT_JITTER_MAX_MS) / 1000


@dataclass
class Timers:
    jitter: Callable[[], float] = field(repr=False)
    retransmit_handshake: float | None = None
    send_keepalive: float | None = None
    new_handshake: float | None = None
    zero_key_material: float | None = None
    persistent_keepalive: float | None = None
    handshake_attempts: int = 0
    need_another_keepalive: bool = False
    sent_last_minute_handshake: bool = False

    # -- hooks ---------------------------------------------------------------

    def on_data_sent(self, now: float) -> None:
        if self.new_handshake is None:
            self.new_handshake = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self.jitter()

    def on_data_received(self, now: float) -> None:
        if self.send_keepalive is None:
            self.send_keepalive = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def on_any_authenticated_packet_sent(self) -> None:
        self.send_keepalive = None

    def on_any_authenticated_packet_received(self) -> None:
        self.new_handshake = None

    def on_handshake_initiated(self, now: float) -> None:
        self.retransmit_handshake = now + REKEY_TIMEOUT + self.jitter()

    def on_handshake_complete(self) -> None:
        self.retransmit_handshake = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

    def on_session_derived(self, now: float) -> None:
        self.zero_key_material = now + 3 * REJECT_AFTER_TIME

    def on_any_authenticated_packet_traversal(self, now: float, keepalive_interval: int) -> None:
        if keepalive_interval > 0:
            self.persistent_keepalive = now + keepalive_interval

    # -- scheduling ----------------------------------------------------------

    def deadline(self, timer: Timer) -> float | None:
        value: float | None = getattr(self, timer.value)
        return value

    def next_deadline(self) -> float | None:
        deadlines = [d for t in Timer if (d := self.deadline(t)) is not None]
        return min(deadlines) if deadlines else None

    def pop_due(self, now: float) -> Timer | None:
        """Unset and return the earliest timer due at ``now`` (None if none is).

        One at a time, because a handler may set or clear other timers. Ties go by
        name, so the order is deterministic.
        """
        due = [(d, t.value) for t in Timer if (d := self.deadline(t)) is not None and d <= now]
        if not due:
            return None
        _, name = min(due)
        setattr(self, name, None)
        return Timer(name)

    def stop(self) -> None:
        for timer in Timer:
            setattr(self, timer.value, None)
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
