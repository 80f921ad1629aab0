"""WireGuardCore: the whole WireGuard protocol for one interface, sans I/O.

The device feeds it three kinds of input and forwards what comes out:

    receive_datagram(data, source, now)   a UDP payload from the network
    send_packet(packet, now)              an IP packet read from the TUN device
    on_timer(now)                         when next_deadline() has come

Each returns an ``Output``: datagrams to send, decrypted packets for the TUN
device, and events (keypairs installed/confirmed/retired/expired, endpoints
learned, handshakes completed: everything a fast path mirrors). The
core never reads a clock or a socket; ``now`` is a monotonic time in seconds.
Two things are injected: ``rng`` (ephemeral keys, indices, jitter, cookie
secrets) and ``wall_clock`` (only for the TAI64N timestamp of initiations,
which the responder compares across our restarts).

The flow follows wireguard-go (send.go, receive.go, timers.go) step for step:
the same timer hooks are called at the same points, so the rekey, keepalive,
retransmit and expiry behaviour is the same. Any input that is dropped bumps
``dropped[reason]``; input that does not authenticate changes no state.

Configuration calls (set_peer, set_private_key, remove_peer) may produce
output too (a persistent keepalive switched on sends at once; retired
keypairs are announced). That output is held and returned by the next call of
any of the three input methods; ``next_deadline()`` then reports ``now`` so
the device calls ``on_timer`` promptly.
"""

from __future__ import annotations

import base64
import collections
import enum
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import ip_network
from typing import Final

from . import crypto, messages, noise
from .allowedips import AllowedIPs
from .cookie import CookieChecker, RateLimiter
from .keypair import (
    EndpointChanged,
    HandshakeCompleted,
    Keypair,
    KeypairConfirmed,
    KeypairExpired,
    KeypairInstalled,
    KeypairRetired,
)
from .netutil import Address, IPNetwork, check_endpoint
from .noise import Handshake, HandshakeError, IndexTable
from .padding import ip_packet_length, pad_plaintext
from .peer import MAX_STAGED_PACKETS, Peer
from .timers import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    Timer,
    Timers,
    jitter_from,
)

__all__ = [
    "Address",
    "Output",
    "Peer",
    "WireGuardCore",
    "KeypairInstalled",
    "KeypairConfirmed",
    "KeypairRetired",
    "KeypairExpired",
    "EndpointChanged",
    "HandshakeCompleted",
]

DEFAULT_MTU = 1420
KEEPALIVE_SIZE = messages.KEEPALIVE_SIZE
_MAX_CONTENT = messages.MAX_MESSAGE_SIZE - messages.TRANSPORT_MIN_SIZE
# Float slack when comparing "at least REKEY_TIMEOUT since" on computed deadlines.
_EPS = 1e-9

log = logging.getLogger("kubespan_dp.core")


def short_key(key: bytes) -> str:
    """A public key abbreviated for logs, as wireguard-go prints peers."""
    text = base64.b64encode(key).decode()
    return f"{text[:4]}…{text[-5:-1]}"


class _Unchanged(enum.Enum):
    """set_peer's default for settings the call leaves as they are (None clears them)."""

    TOKEN = 0


_UNCHANGED: Final = _Unchanged.TOKEN

# One UAPI allowed-IP line: (PREFIX, True) adds, (PREFIX, False) removes, (None,
# False) is `replace_allowed_ips` (see `WireGuardCore.set_peer`).
AllowedIPChange = tuple[IPNetwork | str | None, bool]


@dataclass
class Output:
    datagrams: list[tuple[bytes, Address]] = field(default_factory=list)
    packets: list[bytes] = field(default_factory=list)
    events: list[object] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.datagrams or self.packets or self.events)


class WireGuardCore:
    def __init__(
        self,
        private_key: bytes | None = None,
        *,
        rng: Callable[[int], bytes] = os.urandom,
        wall_clock: Callable[[], float] = time.time,
        mtu: int = DEFAULT_MTU,
    ) -> None:
        self._rng = rng
        self._wall_clock = wall_clock
        self._jitter = jitter_from(rng)
        self.mtu = mtu
        self.under_load = False
        self.dropped: collections.Counter[str] = collections.Counter()
        self.peers: dict[bytes, Peer] = {}
        self.allowed_ips = AllowedIPs()
        self.index_table: IndexTable[tuple[Peer, Handshake | Keypair]] = IndexTable(rng)
        self.cookie_checker = CookieChecker(rng)
        self.rate_limiter = RateLimiter()
        self.private_key: bytes | None = None
        self.public_key: bytes | None = None
        self._out = Output()
        self._pending_since: float | None = None
        # What to do when each timer expires (wireguard-go's expired* functions).
        self._on_expired: dict[Timer, Callable[[Peer, float], None]] = {
            Timer.RETRANSMIT_HANDSHAKE: self._expired_retransmit_handshake,
            Timer.SEND_KEEPALIVE: self._expired_send_keepalive,
            Timer.NEW_HANDSHAKE: self._expired_new_handshake,
            Timer.ZERO_KEY_MATERIAL: self._expired_zero_key_material,
            Timer.PERSISTENT_KEEPALIVE: self._expired_persistent_keepalive,
        }
        if private_key is not None:
            self.set_private_key(private_key, 0.0)
        self._take()

    # ------------------------------------------------------------------ config

    def set_private_key(self, key: bytes | None, now: float) -> None:
        """Change our identity; peers keep their config, sessions are renegotiated."""
        if key is not None and (not isinstance(key, bytes) or len(key) != 32):
            raise ValueError("private key must be 32 bytes")
        if key == self.private_key:
            return
        public = crypto.public_key(key) if key is not None else None
        # A peer with our own public key would be ourselves: wireguard-go removes it.
        if public is not None and public in self.peers:
            self.remove_peer(public)
        self.private_key, self.public_key = key, public
        self.cookie_checker.init(public)
        for peer in self.peers.values():
            peer.handshake.precompute(key)
            self._expire_current_keypairs(peer)
        self._mark_pending(now)

    def set_peer(
        self,
        public_key: bytes,
        now: float,
        *,
        preshared_key: bytes | None | _Unchanged = _UNCHANGED,
        endpoint: Address | None | _Unchanged = _UNCHANGED,
        persistent_keepalive: int | None | _Unchanged = _UNCHANGED,
        allowed_ips: Iterable[IPNetwork | str] | None = None,
        replace_allowed_ips: bool = False,
        allowed_ip_changes: Iterable[AllowedIPChange] = (),
    ) -> Peer:
        """Create or update a peer. Everything is validated before anything changes.

        Allowed IPs: `replace_allowed_ips` drops the peer's, then `allowed_ips` are
        added, then `allowed_ip_changes` are applied one after the other (UAPI lines,
        order-sensitive as in wireguard-go): (PREFIX, True) takes the prefix from
        whichever peer has it, (PREFIX, False) drops it if this peer has it, (None,
        False) drops all of this peer's.
        """
        if not isinstance(public_key, bytes) or len(public_key) != 32:
            raise ValueError("peer public key must be 32 bytes")
        if public_key == self.public_key:
            raise ValueError("peer public key is this interface's own public key")
        if preshared_key is not _UNCHANGED and preshared_key is not None:
            if not isinstance(preshared_key, bytes) or len(preshared_key) != 32:
                raise ValueError("preshared key must be 32 bytes")
        if endpoint is not _UNCHANGED and endpoint is not None:
            endpoint = check_endpoint(endpoint)  # EndpointError is a ValueError
        if persistent_keepalive is not _UNCHANGED and persistent_keepalive is not None:
            if not isinstance(persistent_keepalive, int) or not 0 <= persistent_keepalive <= 65535:
                raise ValueError("persistent keepalive must be 0-65535 seconds")
        networks = [ip_network(n, strict=False) for n in (allowed_ips or ())]
        changes = [
            (ip_network(n, strict=False) if n is not None else None, bool(add))
            for n, add in allowed_ip_changes
        ]

        peer = self.peers.get(public_key)
        if peer is None:
            peer = Peer(public_key, self.allowed_ips, Timers(self._jitter))
            peer.handshake.precompute(self.private_key)
            self.peers[public_key] = peer
        if preshared_key is not _UNCHANGED:
            peer.handshake.preshared_key = preshared_key or noise.ZERO_KEY
        if endpoint is not _UNCHANGED:
            peer.endpoint = endpoint
        turned_on = False
        if persistent_keepalive is not _UNCHANGED:
            old, peer.persistent_keepalive = peer.persistent_keepalive, persistent_keepalive or 0
            turned_on = old == 0 and peer.persistent_keepalive != 0
        if replace_allowed_ips:
            self.allowed_ips.remove_peer(peer)
        for net in networks:
            self.allowed_ips.insert(net, peer)
        for change, add in changes:
            if change is None:
                self.allowed_ips.remove_peer(peer)
            elif add:
                self.allowed_ips.insert(change, peer)
            else:  # `allowed_ip=-PREFIX`: only if this peer owns it
                self.allowed_ips.remove(change, peer)
        if turned_on and self.private_key is not None:
            # wireguard-go sends a keepalive at once when the interval is switched on.
            self._send_keepalive(peer, now)
            self._mark_pending(now)
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is None:
            return
        peer.timers.stop()
        self._zero_and_flush_all(peer)
        self.allowed_ips.remove_peer(peer)
        # Retired keypairs must reach the fast path soon; there is no `now` here.
        self._mark_pending(0.0)

    def remove_all_peers(self) -> None:
        for key in list(self.peers):
            self.remove_peer(key)

    def _mark_pending(self, now: float) -> None:
        if self._out and self._pending_since is None:
            self._pending_since = now

    # ------------------------------------------------------------------ inputs

    def next_deadline(self) -> float | None:
        deadlines = [d for p in self.peers.values() if (d := p.timers.next_deadline()) is not None]
        if self._pending_since is not None:
            deadlines.append(self._pending_since)
        return min(deadlines) if deadlines else None

    def on_timer(self, now: float) -> Output:
        for peer in list(self.peers.values()):
            # Each handler schedules its successors in the future, so this ends.
            while (timer := peer.timers.pop_due(now)) is not None:
                self._on_expired[timer](peer, now)
        return self._take()

    def send_packet(self, packet: bytes, now: float) -> Output:
        """Route an IP packet from the TUN device to its peer, encrypting it."""
        packet = bytes(packet)
        if not packet or packet[0] >> 4 not in (4, 6) or ip_packet_length(packet) is None:
            self.dropped["invalid_packet"] += 1
            return self._take()
        if len(packet) > _MAX_CONTENT:
            self.dropped["packet_too_big"] += 1
            return self._take()
        peer = self.allowed_ips.lookup_packet_destination(packet)
        if not isinstance(peer, Peer):
            self.dropped["no_route"] += 1
            return self._take()
        self._stage(peer, packet)
        self._send_staged(peer, now)
        return self._take()

    def receive_datagram(self, data: bytes, source: Address, now: float) -> Output:
        """Handle one UDP payload from ``source``."""
        data = bytes(data)
        try:
            msg = messages.decode(data)
        except messages.MessageError:
            self.dropped["malformed"] += 1
            return self._take()
        if isinstance(msg, messages.Transport):
            self._receive_transport(msg, data, source, now)
        elif isinstance(msg, messages.CookieReply):
            self._receive_cookie_reply(msg, now)
        else:
            self._receive_handshake(msg, data, source, now)
        return self._take()

    def _take(self) -> Output:
        out, self._out = self._out, Output()
        self._pending_since = None
        return out

    # ------------------------------------------------------------------ sending

    def _transmit(self, peer: Peer, datagrams: list[bytes]) -> bool:
        """Hand datagrams for ``peer`` to the device; False if it has no endpoint."""
        if peer.endpoint is None:
            self.dropped["no_endpoint"] += len(datagrams)
            return False
        for d in datagrams:
            self._out.datagrams.append((d, peer.endpoint))
            peer.tx_bytes += len(d)
        return True

    def _stage(self, peer: Peer, packet: bytes) -> None:
        if len(peer.staged) >= MAX_STAGED_PACKETS:
            peer.staged.popleft()  # the oldest makes room, as wireguard-go does
            self.dropped["staged_overflow"] += 1
        peer.staged.append(packet)

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    def _send_staged(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            return
        kp = peer.keypairs.current
        if (
            kp is None
            or kp.send_counter >= REJECT_AFTER_MESSAGES
            or now - kp.created >= REJECT_AFTER_TIME
        ):
            self._send_handshake_initiation(peer, now, is_retry=False)
            return
        batch: list[bytes] = []
        data_sent = False
        while peer.staged:
            # taken at the counter's owner (the fast path, once it runs the session)
            counter = kp.take_counter()
            if counter >= REJECT_AFTER_MESSAGES:
                break
            plaintext = peer.staged.popleft()
            sealed = kp.send.seal(counter, pad_plaintext(plaintext, self.mtu))
            batch.append(messages.Transport(kp.remote_index, counter, sealed).encode())
            data_sent = data_sent or bool(plaintext)
        peer.timers.on_any_authenticated_packet_traversal(now, peer.persistent_keepalive)
        peer.timers.on_any_authenticated_packet_sent()
        sent = self._transmit(peer, batch)
        if data_sent:
            peer.timers.on_data_sent(now)
        if sent:
            self._keep_key_fresh_sending(peer, now)
        if peer.staged:  # the keypair ran out of counters: a new handshake is needed
            self._send_handshake_initiation(peer, now, is_retry=False)

    def _keep_key_fresh_sending(self, peer: Peer, now: float) -> None:
        kp = peer.keypairs.current
        if kp is None:
            return
        if kp.send_counter > REKEY_AFTER_MESSAGES or (
            kp.is_initiator and now - kp.created > REKEY_AFTER_TIME
        ):
            self._send_handshake_initiation(peer, now, is_retry=False)

    def _send_handshake_initiation(self, peer: Peer, now: float, is_retry: bool) -> None:
        if not is_retry:
            peer.timers.handshake_attempts = 0
        hs = peer.handshake
        if (
            hs.last_sent_handshake is not None
            and now - hs.last_sent_handshake < REKEY_TIMEOUT - _EPS
        ):
            return
        if self.private_key is None:
            return
        hs.last_sent_handshake = now
        old_index = hs.local_index
        new_index = self._new_index(peer, hs)
        try:
            msg = noise.create_initiation(
                hs,
                self.private_key,
                crypto.generate_private_key(self._rng(32)),
                crypto.tai64n(self._wall_clock()),
                new_index,
                self.public_key,  # kept: no scalar multiplication per handshake
            )
        except HandshakeError as exc:
            self.index_table.delete(new_index)
            self.dropped[exc.reason.value] += 1
            return
        if old_index:
            self._forget_handshake_index(old_index, hs)
        packet = peer.cookie_generator.add_macs(msg.encode(), now)
        peer.timers.on_any_authenticated_packet_traversal(now, peer.persistent_keepalive)
        peer.timers.on_any_authenticated_packet_sent()
        self._transmit(peer, [packet])
        peer.timers.on_handshake_initiated(now)
        log.debug(
            "peer %s: handshake initiation sent (index %d%s)",
            short_key(peer.public_key),
            new_index,
            ", retry" if is_retry else "",
        )

    def _new_index(self, peer: Peer, value: Handshake | Keypair) -> int:
        return self.index_table.new_index((peer, value))

    def _send_handshake_response(self, peer: Peer, now: float) -> None:
        hs = peer.handshake
        hs.last_sent_handshake = now
        old_index = hs.local_index
        new_index = self._new_index(peer, hs)
        try:
            msg = noise.create_response(hs, crypto.generate_private_key(self._rng(32)), new_index)
        except HandshakeError as exc:
            self.index_table.delete(new_index)
            self.dropped[exc.reason.value] += 1
            return
        if old_index and old_index != new_index:
            self._forget_handshake_index(old_index, hs)
        packet = peer.cookie_generator.add_macs(msg.encode(), now)
        self._begin_symmetric_session(peer, now)
        peer.timers.on_session_derived(now)
        peer.timers.on_any_authenticated_packet_traversal(now, peer.persistent_keepalive)
        peer.timers.on_any_authenticated_packet_sent()
        self._transmit(peer, [packet])
        log.debug(
            "peer %s: initiation answered, session %d waits for its first data",
            short_key(peer.public_key),
            new_index,
        )

    def _forget_handshake_index(self, index: int, hs: Handshake) -> None:
        entry = self.index_table.get(index)
        if entry is not None and entry[1] is hs:
            self.index_table.delete(index)

    def _begin_symmetric_session(self, peer: Peer, now: float) -> None:
        kp = noise.derive_keypair(peer.handshake, now)
        # The handshake's index now names the keypair.
        self.index_table.replace(kp.local_index, (peer, kp))
        for old in peer.keypairs.install(kp):
            self._retire(peer, old)
        confirmed = peer.keypairs.current is kp
        self._out.events.append(
            KeypairInstalled(peer.public_key, kp, confirmed, peer.keypairs.previous)
        )

    def _retire(self, peer: Peer, kp: Keypair) -> None:
        entry = self.index_table.get(kp.local_index)
        if entry is not None and entry[1] is kp:
            self.index_table.delete(kp.local_index)
        self._out.events.append(KeypairRetired(peer.public_key, kp.local_index))

    def _roam(self, peer: Peer, source: Address) -> None:
        """An authenticated message came from `source`: answer there from now on."""
        if peer.endpoint != source:
            log.debug(
                "peer %s: endpoint %s -> %s", short_key(peer.public_key), peer.endpoint, source
            )
            peer.endpoint = source
            self._out.events.append(EndpointChanged(peer.public_key, source))

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        peer.timers.on_handshake_complete()
        peer.last_handshake = now
        self._out.events.append(HandshakeCompleted(peer.public_key, now))

    def _zero_and_flush_all(self, peer: Peer) -> None:
        for kp in peer.keypairs.clear():
            self._retire(peer, kp)
        self._forget_handshake_index(peer.handshake.local_index, peer.handshake)
        peer.handshake.clear()
        self._flush_staged(peer)

    def _flush_staged(self, peer: Peer) -> None:
        self.dropped["staged_flushed"] += sum(1 for p in peer.staged if p)
        peer.staged.clear()

    def _expire_current_keypairs(self, peer: Peer) -> None:
        hs = peer.handshake
        self._forget_handshake_index(hs.local_index, hs)
        hs.clear()
        hs.last_sent_handshake = None
        for kp in (peer.keypairs.current, peer.keypairs.next):
            if kp is not None:
                kp.send_counter = REJECT_AFTER_MESSAGES
                self._out.events.append(KeypairExpired(peer.public_key, kp.local_index))

    # ------------------------------------------------------------------ timers

    def _expired_retransmit_handshake(self, peer: Peer, now: float) -> None:
        if peer.timers.handshake_attempts > MAX_TIMER_HANDSHAKES:
            peer.timers.send_keepalive = None
            self._flush_staged(peer)
            if peer.timers.zero_key_material is None:
                peer.timers.zero_key_material = now + 3 * REJECT_AFTER_TIME
        else:
            peer.timers.handshake_attempts += 1
            self._send_handshake_initiation(peer, now, is_retry=True)

    def _expired_send_keepalive(self, peer: Peer, now: float) -> None:
        self._send_keepalive(peer, now)
        if peer.timers.need_another_keepalive:
            peer.timers.need_another_keepalive = False
            peer.timers.send_keepalive = now + KEEPALIVE_TIMEOUT

    def _expired_new_handshake(self, peer: Peer, now: float) -> None:
        self._send_handshake_initiation(peer, now, is_retry=False)

    def _expired_zero_key_material(self, peer: Peer, now: float) -> None:
        self._zero_and_flush_all(peer)

    def _expired_persistent_keepalive(self, peer: Peer, now: float) -> None:
        if peer.persistent_keepalive > 0:
            self._send_keepalive(peer, now)

    # ------------------------------------------------------------------ receiving

    def _receive_cookie_reply(self, msg: messages.CookieReply, now: float) -> None:
        entry = self.index_table.get(msg.receiver)
        if entry is None:
            self.dropped["unknown_index"] += 1
            return
        if not entry[0].cookie_generator.consume_reply(msg.nonce, msg.cookie, now):
            self.dropped["invalid_cookie_reply"] += 1

    def _receive_handshake(
        self, msg: messages.Initiation | messages.Response, data: bytes, source: Address, now: float
    ) -> None:
        if not self.cookie_checker.check_mac1(data):
            self.dropped["invalid_mac1"] += 1
            return
        if self.under_load:
            if not self.cookie_checker.check_mac2(data, source, now):
                try:
                    reply = self.cookie_checker.create_reply(data, msg.sender, source, now)
                except ValueError:  # an unparseable source address: nothing to answer
                    self.dropped["invalid_source"] += 1
                    return
                self._out.datagrams.append((reply, source))
                self.dropped["under_load_cookie_sent"] += 1
                return
            if not self.rate_limiter.allow(source[0], now):
                self.dropped["rate_limited"] += 1
                return
        if isinstance(msg, messages.Initiation):
            self._receive_initiation(msg, data, source, now)
        else:
            self._receive_response(msg, data, source, now)

    def _receive_initiation(
        self, msg: messages.Initiation, data: bytes, source: Address, now: float
    ) -> None:
        if self.private_key is None:
            self.dropped["no_private_key"] += 1
            return

        def lookup(key: bytes) -> tuple[Peer, Handshake] | None:
            peer = self.peers.get(key)
            return (peer, peer.handshake) if peer is not None else None

        try:
            consumed = noise.consume_initiation(msg, self.private_key, lookup, now, self.public_key)
        except HandshakeError as exc:
            self.dropped[exc.reason.value] += 1
            return
        consumed.commit()
        peer = consumed.peer
        peer.timers.on_any_authenticated_packet_traversal(now, peer.persistent_keepalive)
        peer.timers.on_any_authenticated_packet_received()
        self._roam(peer, source)
        peer.rx_bytes += len(data)
        self._send_handshake_response(peer, now)

    def _receive_response(
        self, msg: messages.Response, data: bytes, source: Address, now: float
    ) -> None:
        peer, hs = self.index_table.get(msg.receiver) or (None, None)
        if peer is None or not isinstance(hs, Handshake) or self.private_key is None:
            self.dropped["unknown_index"] += 1
            log.debug("response for unknown index %d from %s dropped", msg.receiver, source)
            return
        try:
            consumed = noise.consume_response(msg, hs, self.private_key)
        except HandshakeError as exc:
            self.dropped[exc.reason.value] += 1
            return
        consumed.commit()
        self._roam(peer, source)
        peer.rx_bytes += len(data)
        peer.timers.on_any_authenticated_packet_traversal(now, peer.persistent_keepalive)
        peer.timers.on_any_authenticated_packet_received()
        self._begin_symmetric_session(peer, now)
        peer.timers.on_session_derived(now)
        self._handshake_complete(peer, now)
        log.debug(
            "peer %s: response received, session %d", short_key(peer.public_key), msg.receiver
        )
        self._send_keepalive(peer, now)

    def _receive_transport(
        self, msg: messages.Transport, data: bytes, source: Address, now: float
    ) -> None:
        peer, kp = self.index_table.get(msg.receiver) or (None, None)
        if peer is None or not isinstance(kp, Keypair):
            self.dropped["unknown_index"] += 1
            return
        if kp.created + REJECT_AFTER_TIME < now:
            self.dropped["keypair_expired"] += 1
            return
        # the window's one owner: ours, or the fast path's once it runs the session
        window = kp.window
        if not window.check(msg.counter):
            self.dropped["replay"] += 1
            return
        try:
            plaintext = kp.receive.open(msg.counter, msg.ciphertext)
        except crypto.AuthenticationError:
            self.dropped["decrypt_failed"] += 1
            return
        if not window.update(msg.counter):
            self.dropped["replay"] += 1
            return

        # Authenticated from here on.
        promoted, retired = peer.keypairs.received_with(kp)
        if promoted:
            for old in retired:
                self._retire(peer, old)
            self._out.events.append(KeypairConfirmed(peer.public_key, kp, peer.keypairs.previous))
            log.debug("peer %s: session %d confirmed", short_key(peer.public_key), kp.local_index)
            self._roam(peer, source)
            self._handshake_complete(peer, now)
            self._send_staged(peer, now)
        peer.rx_bytes += len(plaintext) + messages.TRANSPORT_MIN_SIZE
        packet = self._inner_packet(peer, plaintext)
        self._roam(peer, source)
        self._keep_key_fresh_receiving(peer, now)
        peer.timers.on_any_authenticated_packet_traversal(now, peer.persistent_keepalive)
        peer.timers.on_any_authenticated_packet_received()
        if plaintext:
            peer.timers.on_data_received(now)
        if packet is not None:
            self._out.packets.append(packet)

    def _inner_packet(self, peer: Peer, plaintext: bytes) -> bytes | None:
        """The IP packet inside, padding stripped, if its source is the peer's."""
        if not plaintext:
            return None  # keepalive
        length = ip_packet_length(plaintext)
        if length is None:
            self.dropped["invalid_inner_packet"] += 1
            return None
        packet = plaintext[:length]
        if self.allowed_ips.lookup_packet_source(packet) is not peer:
            self.dropped["source_not_allowed"] += 1
            return None
        return packet

    def keep_key_fresh_receiving(self, public_key: bytes, now: float) -> None:
        """A fast path received data for this peer near the session's end: the core
        decides whether to rekey (receive.go keepKeyFreshReceiving).  The output
        comes with the next call of an input method (or `on_timer`)."""
        peer = self.peers.get(public_key)
        if peer is not None:
            self._keep_key_fresh_receiving(peer, now)

    def _keep_key_fresh_receiving(self, peer: Peer, now: float) -> None:
        if peer.timers.sent_last_minute_handshake:
            return
        kp = peer.keypairs.current
        if (
            kp is not None
            and kp.is_initiator
            and (now - kp.created > REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT)
        ):
            peer.timers.sent_last_minute_handshake = True
            self._send_handshake_initiation(peer, now, is_retry=False)
