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

from . import crypto
from .replay import ReplayWindow


@dataclass(eq=False)
class Keypair:
    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)
    local_index: int
    remote_index: int
    is_initiator: bool
    created: float
    send_counter: int = 0
    replay: ReplayWindow = field(default_factory=ReplayWindow, repr=False)
    send: crypto.AEAD = field(init=False, repr=False)
    receive: crypto.AEAD = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.send = crypto.AEAD(self.send_key)
        self.receive = crypto.AEAD(self.receive_key)


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
