"""Transport keypairs, the three per-peer slots, and the events a fast path follows.

A peer holds up to three keypairs (wireguard-go keypair.go / noise-protocol.go):

* ``current``  - what we send with;
* ``previous`` - the one before, kept so packets still in flight decrypt;
* ``next``     - a responder's fresh keypair, not yet confirmed. The responder
  must not send on it until the initiator has used it (key confirmation),
  because until then it cannot know the initiator derived the same keys.
  The first authenticated packet received on ``next`` promotes it.

Installing or promoting a keypair retires others; the caller removes retired
keypairs from the index table and reports them as ``KeypairRetired``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from . import crypto
from .replay import ReplayWindow
from .timers import REJECT_AFTER_MESSAGES


class CounterOwner(Protocol):
    """Who owns a keypair's send counter once a fast path runs the session."""

    @property
    def send_counter(self) -> int: ...

    def reserve_counter(self) -> int: ...

    def expire(self) -> None: ...


@dataclass(eq=False)
class Keypair:
    """One session.  Its send counter has exactly one owner: the keypair itself, or,
    once a fast path took the session over (`hand_counter_to`), that fast path.
    Every nonce is taken with `take_counter()`, atomically at the owner, so the core
    and the fast path can both seal on a session without ever reusing a nonce."""

    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)
    local_index: int
    remote_index: int
    is_initiator: bool
    created: float
    replay: ReplayWindow = field(default_factory=ReplayWindow, repr=False)
    send: crypto.AEAD = field(init=False, repr=False)
    receive: crypto.AEAD = field(init=False, repr=False)
    _counter: int = field(default=0, init=False, repr=False)
    _owner: CounterOwner | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.send = crypto.AEAD(self.send_key)
        self.receive = crypto.AEAD(self.receive_key)

    @property
    def send_counter(self) -> int:
        """The next counter the owner would hand out (the limit: exhausted)."""
        if self._owner is not None:
            return min(self._owner.send_counter, REJECT_AFTER_MESSAGES)
        return self._counter

    @send_counter.setter
    def send_counter(self, value: int) -> None:
        # Only expiry (the limit) may be set once the counter is handed over.
        if self._owner is not None:
            if value != REJECT_AFTER_MESSAGES:
                raise ValueError("the send counter belongs to the fast path")
            self._owner.expire()
        self._counter = value

    def take_counter(self) -> int:
        """The next nonce counter, never handed out twice; the limit if exhausted."""
        if self._owner is not None:
            return min(self._owner.reserve_counter(), REJECT_AFTER_MESSAGES)
        counter = self._counter
        if counter >= REJECT_AFTER_MESSAGES:
            return REJECT_AFTER_MESSAGES
        self._counter = counter + 1
        return counter

    def hand_counter_to(self, owner: CounterOwner) -> None:
        """From now on `owner` hands out the counters; it must start at ours."""
        if self._owner is not None and self._owner is not owner:
            raise ValueError("the send counter already has another owner")
        if owner.send_counter < self._counter:
            raise ValueError("the new owner would reuse counters")
        self._owner = owner

    @property
    def counter_owner(self) -> CounterOwner | None:
        return self._owner


@dataclass
class Keypairs:
    current: Keypair | None = None
    previous: Keypair | None = None
    next: Keypair | None = None

    def install(self, keypair: Keypair) -> list[Keypair]:
        """Add a freshly derived keypair; returns the keypairs it retires."""
        retired: list[Keypair] = []
        if keypair.is_initiator:
            # We initiated, so the response was our confirmation: use it at once.
            if self.next is not None:
                retired += [k for k in (self.current, self.previous) if k is not None]
                self.previous, self.next = self.next, None
            else:
                retired += [k for k in (self.previous,) if k is not None]
                self.previous = self.current
            self.current = keypair
        else:
            retired += [k for k in (self.next, self.previous) if k is not None]
            self.next = keypair
            self.previous = None
        return retired

    def received_with(self, keypair: Keypair) -> tuple[bool, list[Keypair]]:
        """Note a packet authenticated by ``keypair``: (promoted next to current?, retired)."""
        if keypair is not self.next:
            return False, []
        retired = [self.previous] if self.previous is not None else []
        self.previous, self.current, self.next = self.current, keypair, None
        return True, retired

    def clear(self) -> list[Keypair]:
        retired = [k for k in (self.previous, self.current, self.next) if k is not None]
        self.previous = self.current = self.next = None
        return retired

    def all(self) -> list[Keypair]:
        return [k for k in (self.current, self.previous, self.next) if k is not None]


# --- events (for a fast path that keeps its own copy of the keys) -------------


@dataclass(frozen=True)
class KeypairInstalled:
    peer_key: bytes
    local_index: int
    remote_index: int
    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)
    is_initiator: bool
    created: float

    @classmethod
    def of(cls, peer_key: bytes, kp: Keypair) -> KeypairInstalled:
        return cls(
            peer_key,
            kp.local_index,
            kp.remote_index,
            kp.send_key,
            kp.receive_key,
            kp.is_initiator,
            kp.created,
        )


@dataclass(frozen=True)
class KeypairRetired:
    peer_key: bytes
    local_index: int


@dataclass(frozen=True)
class KeypairExpired:
    """Stop sending on this keypair (it may still decrypt); after a private-key change."""

    peer_key: bytes
    local_index: int


@dataclass(frozen=True)
class HandshakeCompleted:
    peer_key: bytes
    time: float
