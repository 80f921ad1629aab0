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

The events at the end are the whole seam to a fast path: each says which keypair
went where, so a fast path keeps its copy of the slots without reading a peer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from . import crypto
from .netutil import Address
from .replay import ReplayWindow
from .timers import REJECT_AFTER_MESSAGES


class CounterOwner(Protocol):
    """Who owns a keypair's send counter once a fast path runs the session."""

    @property
    def send_counter(self) -> int: ...

    def reserve_counter(self) -> int: ...

    def expire(self) -> None: ...


class ReceiveWindow(Protocol):
    """A keypair's replay window: the core's own `ReplayWindow`, or a fast path's."""

    def check(self, counter: int) -> bool: ...

    def update(self, counter: int) -> bool: ...


@dataclass(eq=False)
class Keypair:
    """One session.  Its send counter and its receive window each have exactly one
    owner: the keypair itself, or, once a fast path took the session over
    (`hand_counter_to`, `hand_window_to`), that fast path.  Every nonce is taken with
    `take_counter()`, every received counter checked and recorded through `window`,
    atomically at the owner, so the core and the fast path can both seal and open on
    a session without ever reusing a nonce or accepting a counter twice."""

    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)
    local_index: int
    remote_index: int
    is_initiator: bool
    created: float
    # the core's own window: the one in use until a fast path takes it over
    replay: ReplayWindow = field(default_factory=ReplayWindow, repr=False)
    send: crypto.AEAD = field(init=False, repr=False)
    receive: crypto.AEAD = field(init=False, repr=False)
    _counter: int = field(default=0, init=False, repr=False)
    _owner: CounterOwner | None = field(default=None, init=False, repr=False)
    _window: ReceiveWindow | None = field(default=None, init=False, repr=False)

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

    @property
    def window(self) -> ReceiveWindow:
        """Where received counters are checked and recorded: the owner's window."""
        return self._window if self._window is not None else self.replay

    def hand_window_to(self, owner: ReceiveWindow) -> None:
        """From now on `owner`'s window alone decides; it must already hold every
        counter ours accepted (`replay` is not consulted again)."""
        if self._window is not None and self._window is not owner:
            raise ValueError("the receive window already has another owner")
        self._window = owner

    @property
    def window_owner(self) -> ReceiveWindow | None:
        return self._window


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


# --- events: the seam to a fast path ----------------------------------------
#
# In the order the core emits them, they describe every change of a peer's three
# slots (see `Keypairs`): applied one after the other to a copy of (current,
# previous, next), they leave it equal to the peer's.  The keypair itself travels
# with them, so a fast path can take its send counter and receive window over.


@dataclass(frozen=True)
class KeypairInstalled:
    """A fresh session.  `confirmed` (we initiated): it is now `current`; else (we
    responded) it waits as `next` until the peer's first packet on it
    (`KeypairConfirmed`).  `previous`: the receive-only keypair after this change."""

    peer_key: bytes
    keypair: Keypair = field(repr=False)
    confirmed: bool
    previous: Keypair | None = field(repr=False)

    @property
    def local_index(self) -> int:
        return self.keypair.local_index

    @property
    def remote_index(self) -> int:
        return self.keypair.remote_index

    @property
    def send_key(self) -> bytes:
        return self.keypair.send_key

    @property
    def receive_key(self) -> bytes:
        return self.keypair.receive_key

    @property
    def is_initiator(self) -> bool:
        return self.keypair.is_initiator

    @property
    def created(self) -> float:
        return self.keypair.created


@dataclass(frozen=True)
class KeypairConfirmed:
    """The peer used its `next` keypair: it is `current` now, `previous` the old one."""

    peer_key: bytes
    keypair: Keypair = field(repr=False)
    previous: Keypair | None = field(repr=False)

    @property
    def local_index(self) -> int:
        return self.keypair.local_index


@dataclass(frozen=True)
class KeypairRetired:
    """Gone from every slot (and from the index table): neither send nor receive."""

    peer_key: bytes
    local_index: int


@dataclass(frozen=True)
class KeypairExpired:
    """Stop sending on this keypair (it may still decrypt); after a private-key change."""

    peer_key: bytes
    local_index: int


@dataclass(frozen=True)
class EndpointChanged:
    """The core learned the peer's address from an authenticated message (roaming).
    Configured endpoints (`set_peer`) are not announced: the caller made them."""

    peer_key: bytes
    endpoint: Address


@dataclass(frozen=True)
class HandshakeCompleted:
    peer_key: bytes
    time: float
