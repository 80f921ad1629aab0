"""A configured peer: its settings, counters and protocol state.

The protocol logic that drives these fields lives in ``core.py``; a Peer is the
record of one remote public key.
"""

from __future__ import annotations

import collections
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING

from .cookie import CookieGenerator
from .keypair import Keypairs
from .netutil import Address
from .noise import ZERO_KEY, Handshake
from .timers import Timers

if TYPE_CHECKING:
    from .allowedips import AllowedIPs

# Packets waiting for a session (wireguard-go QueueStagedSize = IdealBatchSize).
MAX_STAGED_PACKETS = 128
MAX_PEERS = 1 << 16  # peers per device, as wireguard-go\'s MaxPeers


class Peer:
    def __init__(self, public_key: bytes, trie: AllowedIPs, timers: Timers) -> None:
        self.public_key = public_key
        self.endpoint: Address | None = None
        self.persistent_keepalive = 0
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake: float | None = None
        self.handshake = Handshake(remote_static=public_key)
        self.keypairs = Keypairs()
        self.timers = timers
        self.cookie_generator = CookieGenerator(public_key)
        self.staged: collections.deque[bytes] = collections.deque()
        self._trie = trie

    @property
    def preshared_key(self) -> bytes | None:
        psk = self.handshake.preshared_key
        return None if psk == ZERO_KEY else psk

    @property
    def allowed_ips(self) -> list[IPv4Network | IPv6Network]:
        return self._trie.entries_for(self)

    def __repr__(self) -> str:
        # Public keys are not secret, but keep the repr short; never show the PSK.
        return f"Peer({self.public_key.hex()[:16]}..., endpoint={self.endpoint})"
