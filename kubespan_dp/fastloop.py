"""The fast packet path: the C `PacketLoop` moves data packets; the core decides.

A drop-in for `pypath.PyDataPath` (same constructor and methods; see that module
for the contract with the device).  Division of labour:

- C threads (in `_fastpath.pyx`) read TUN, seal, sendmmsg; recvmmsg, open, check
  replay and source, write TUN — for every keypair the core has *confirmed*.
- Everything else reaches Python through the loop's slow queue and goes to the core
  unchanged: handshake and cookie messages (via the device's handshake queue), data
  on indices C does not know (the responder's first packet on a fresh keypair), and
  packets for peers without a usable session.

The core stays the single source of truth.  Its output's events (KeypairInstalled,
KeypairRetired, KeypairExpired, HandshakeCompleted) name the peers whose sessions
changed; before that output's datagrams leave, those peers' sessions, endpoints and
not-yet-confirmed indices are mirrored into C.  A full walk (peers, endpoints,
allowed IPs) runs after each UAPI set and on a short tick.  C's activity goes back to
the core (byte counters, roamed endpoints, and the timer hooks wireguard-go calls on
data sent/received), so keepalives, rekeys and expiry work as in the pure-Python path.

Nonces: once a keypair is in C, C owns its send counter.  The core's keypair hands
its counter over (`Keypair.hand_counter_to`): whatever the core seals on it later (a
keepalive from a timer, staged packets) takes its counter from C atomically, so no
counter is ever used twice on the wire.  Sessions are only ever found by our own
index (the receiver field of what peers send us), never by the index a peer chose.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from . import _fastpath as fp
from .datapath import fastpath_enabled
from .netutil import Address
from .peer import MAX_PEERS
from .pypath import MAX_SOURCES, PyDataPath
from .tun import UDP_OFFLOADS

SYNC_INTERVAL = 0.1  # seconds between C -> core activity syncs
HANDSHAKE_SIZES = {1: 148, 2: 92}  # initiation, response (cookie replies need no DH)
HANDSHAKE_BATCH = 1024  # handshake messages taken from C per wakeup
_HEADER = struct.Struct("<IIQ")

log = logging.getLogger("kubespan_dp.fastloop")


__all__ = ["FastDataPath", "fastpath_enabled"]


class _Installed:
    """A core keypair mirrored in C: C owns its send counter and receive window."""

    __slots__ = ("core_kp", "c_kp")

    def __init__(self, core_kp: Any) -> None:
        self.core_kp = core_kp
        owner = core_kp.counter_owner
        if isinstance(owner, fp.Keypair):
            self.c_kp = owner  # mirrored before: C keeps the one counter and window
            return
        self.c_kp = fp.Keypair(
            core_kp.send_key,
            core_kp.receive_key,
            core_kp.local_index,
            core_kp.remote_index,
            is_initiator=core_kp.is_initiator,
            created=core_kp.created,
            send_counter=core_kp.send_counter,
        )
        window = core_kp.replay
        if not window.check(window.last):  # the core already opened packets on it
            self.c_kp.seed_replay(window.last)
        # from now on C alone hands out this session's counters, to C and to the core
        core_kp.hand_counter_to(self.c_kp)


class FastDataPath:
    def __init__(
        self,
        core: Any,
        tun_fd: int,
        on_handshake: Callable[[bytes, Address, float], None],
        on_batch: Callable[[], None],
        on_link_gone: Callable[[], None],
        offload_flags: int = 0,
    ) -> None:
        self.core = core
        # Python-side sends and TUN writes (core output) reuse the plain path's code.
        vnet = offload_flags != 0  # tun.Tun: offloads come with IFF_VNET_HDR
        self.py = PyDataPath(core, tun_fd, on_handshake, on_batch, on_link_gone, vnet_hdr=vnet)
        self.on_handshake = on_handshake
        self.on_batch = on_batch
        self.on_link_gone = on_link_gone
        uso = offload_flags & UDP_OFFLOADS == UDP_OFFLOADS
        self.c = fp.PacketLoop(
            tun_fd, -1, -1, core.mtu, max_peers=MAX_PEERS, vnet_hdr=vnet, uso=uso
        )
        self._mtu = core.mtu
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._ids: dict[bytes, int] = {}  # peer public key -> C slot
        self._free: list[int] = []
        self._next_id = 0
        self._keypairs: dict[int, tuple[Any, Any]] = {}  # slot -> core (current, previous)
        self._installed: dict[int, _Installed] = {}  # id(core keypair) -> mirror
        self._by_local: dict[int, _Installed] = {}  # local index -> mirror
        self._endpoints: dict[int, Address | None] = {}
        self._sources: dict[int, tuple[bytes, int]] = {}  # sticky source pushed to C
        self._stats: dict[int, tuple[float, ...]] = {}
        self._routes: object = None
        self._own_drops: Counter[str] = Counter()
        self._pending: frozenset[int] = frozenset()
        self._pending_of: dict[bytes, frozenset[int]] = {}  # peer -> its pending indices

    # ------------------------------------------------------------- the device's contract

    @property
    def dropped(self) -> Counter[str]:
        # whatever the C loop queued for Python is handled first, so the counts
        # cover every datagram received so far
        if self.loop is not None:
            self._on_slow()
        return self.py.dropped + self._own_drops + Counter(self.c.drops())

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reconcile()
        loop.add_reader(self.c.slow_fd, self._on_slow)
        self.c.start()
        self._tick_handle = loop.call_later(SYNC_INTERVAL, self._tick)
        log.info("packet path: C fast path (batched TUN/UDP I/O, OpenSSL ChaCha20-Poly1305)")

    def detach(self) -> None:
        if self.loop is None:
            return
        self.c.stop()
        self.loop.remove_reader(self.c.slow_fd)
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self.loop = None

    def rebind(self, sock4: Any, sock6: Any) -> None:
        self.py.rebind(sock4, sock6)  # self.py is never attached: it registers nothing
        self.c.rebind(
            sock4.fileno() if sock4 is not None else -1, sock6.fileno() if sock6 is not None else -1
        )

    def emit(self, out: Any) -> None:
        self._send_output(out)

    def _send_output(self, out: Any) -> None:
        # A handshake may have produced a session: C learns it (or, for a responder's
        # unconfirmed one, its index) before the datagrams leave, so the peer's first
        # packet on it cannot beat it here.  Counters stay right either way: they
        # come from the session's one owner.
        self._guarded("sessions", self._apply_events, out)
        # Core output is sealed with counters from each session's one owner (the
        # core's keypair, or C once it runs the session): sent as it is.
        for data, addr in out.datagrams:
            if data[:1] == b"\x01" and self.py.clear_source_on_retry(addr):
                for key, pid in self._ids.items():
                    peer = self.core.peers.get(key)
                    if peer is not None and peer.endpoint == addr:
                        self.c.set_source(pid, None)
                        self._sources.pop(pid, None)
            self.py.send(data, addr)
        if out.packets:
            self.py._write_tun(out.packets)

    def send(self, data: bytes, addr: Address) -> None:
        self.py.send(data, addr)

    # ------------------------------------------------------------- slow path

    def _internal_error(self, where: str) -> None:
        """A callback failed on one item: count it, log it, and carry on."""
        self._own_drops[f"internal_error_{where}"] += 1
        log.exception("internal error in %s (the packet path carries on)", where)

    def _on_slow(self) -> None:
        # Never lets an exception out: the event loop would drop this reader.
        try:
            if self.c.link_gone:
                self.on_link_gone()
                return
            items = self.c.take_slow()
            handshakes = self.c.take_handshakes(HANDSHAKE_BATCH)
            if not items and not handshakes:
                return
            now = time.monotonic()
            self._guarded("sync", self.sync, now)
            for item in items:
                try:
                    self._slow_item(item, now)
                except Exception:
                    self._internal_error("slow_item")
            for data, source, local in handshakes:
                try:
                    self._handshake_item(data, source, local, now)
                except Exception:
                    self._internal_error("handshake_item")
            self.on_batch()
        except Exception:
            self._internal_error("slow_path")

    def _guarded(self, where: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self._internal_error(where)

    def _note_source(self, source: Address | None, local: tuple[bytes, int] | None) -> None:
        sources = self.py.sources
        if local is not None and source is not None and sources.get(source) != local:
            # answer handshakes from the address the peer wrote to (sticky source)
            if len(sources) >= MAX_SOURCES:
                sources.clear()
            sources[source] = local

    def _handshake_item(
        self, data: bytes, source: Address | None, local: tuple[bytes, int] | None, now: float
    ) -> None:
        # C checked type and size; only work worth queueing (a DH) waits in the
        # device's handshake queue, cookie replies are settled by the core at once
        if source is None:
            self._own_drops["invalid_source"] += 1
            return
        self._note_source(source, local)
        if data[0] in HANDSHAKE_SIZES:
            if self.core.cookie_checker.check_mac1(data):
                self.on_handshake(data, source, now)
            else:
                self._own_drops["invalid_mac1"] += 1
        else:
            self._send_output(self.core.receive_datagram(data, source, now))

    def routes_changed(self) -> None:
        """Allowed IPs changed (UAPI set): C gets the new table now, not on a tick."""
        self.reconcile(routes=True)

    def handshake_backlog(self) -> int:
        """Handshake messages still waiting in C's own bounded queue."""
        return self.c.handshake_backlog

    def _slow_item(self, item: tuple[int, bytes, Address | None, int, Any], now: float) -> None:
        kind, data, source, _peer, local = item
        core = self.core
        self._note_source(source, local)
        if kind == fp.SLOW_PACKET:
            self._send_output(core.send_packet(data, now))
        elif source is None:
            self._own_drops["invalid_source"] += 1
        else:
            # data on a session the core runs and C does not (yet): the core decides
            self._send_output(core.receive_datagram(data, source, now))
            self._mirror_replay(data)

    def _mirror_replay(self, data: bytes) -> None:
        # The core opened a data packet on a keypair that is (now) in C too: C's
        # window must learn the counter, or a replay of it would pass there.
        if len(data) < 32:
            return
        kind, receiver, counter = _HEADER.unpack_from(data)
        mirror = self._by_local.get(receiver)
        if kind == 4 and mirror is not None and not mirror.core_kp.replay.check(counter):
            self.c.mark_received(receiver, counter)

    def _tick(self) -> None:
        self._tick_handle = None
        if self.loop is None:
            return
        try:
            now = time.monotonic()
            self._guarded("sync", self.sync, now)
            self._guarded("reconcile", self.reconcile)
            self._guarded("batch", self.on_batch)
        finally:
            self._tick_handle = self.loop.call_later(SYNC_INTERVAL, self._tick)

    # ------------------------------------------------------------- C -> core

    def sync(self, now: float) -> None:
        """Feed what the C loop did since the last sync into the core's peers."""
        out = None
        for key, pid in self._ids.items():
            peer = self.core.peers.get(key)
            if peer is None:
                continue
            tx, rx, tx_any, tx_data, rx_any, rx_data, flags = self.c.peer_stats(pid)
            old = self._stats.get(pid, (0, 0, 0.0, 0.0, 0.0, 0.0))
            self._stats[pid] = (tx, rx, tx_any, tx_data, rx_any, rx_data)
            peer.tx_bytes += tx - old[0]
            peer.rx_bytes += rx - old[1]
            happened = []
            if tx_any > old[2]:
                happened.append((tx_any, True, tx_data > old[3]))
            if rx_any > old[4]:
                happened.append((rx_any, False, rx_data > old[5]))
            timers = peer.timers
            # the hooks wireguard-go's send.go / receive.go call, in time order
            for t, sent, data in sorted(happened):
                timers.on_any_authenticated_packet_traversal(t, peer.persistent_keepalive)
                if sent:
                    timers.on_any_authenticated_packet_sent()
                    if data:
                        timers.on_data_sent(t)
                else:
                    timers.on_any_authenticated_packet_received()
                    if data:
                        timers.on_data_received(t)
            if flags & fp.FLAG_ENDPOINT:
                endpoint = self.c.get_endpoint(pid)
                peer.endpoint = endpoint
                self._endpoints[pid] = endpoint
            if flags & fp.FLAG_REKEY_RX:
                # receive.go keepKeyFreshReceiving: the core knows whether it is due
                self.core.keep_key_fresh_receiving(key, now)
                out = True
        if out:
            self.emit(self.core.on_timer(now))

    # ------------------------------------------------------------- core -> C

    def reconcile(self, routes: bool = True) -> None:
        """Make the C loop's peers, endpoints, keypairs and routes match the core.

        The full walk runs on the tick, on attach and after a UAPI set; the core's
        output in between names the peers whose sessions changed (its events), and
        only those are brought up to date (`_apply_events`).  Routes are compared
        only when asked: walking every peer's allowed IPs is the costly part.
        """
        core = self.core
        if core.mtu != self._mtu:  # the device follows the link MTU
            self.c.set_mtu(core.mtu)
            self._mtu = core.mtu
        for key in [k for k in self._ids if k not in core.peers]:
            self._sync_peer(key)
        for key in core.peers:
            self._sync_peer(key)
        self._push_pending()
        if not routes:
            return
        table = tuple(
            (self._ids[k], tuple(p.allowed_ips)) for k, p in core.peers.items() if k in self._ids
        )
        if table != self._routes:
            self.c.set_allowed_ips(
                (net.network_address.packed, net.prefixlen, pid)
                for pid, nets in table
                for net in nets
            )
            self._routes = table

    def _apply_events(self, out: Any) -> None:
        """The core's events name the peers whose sessions changed (KeypairInstalled,
        KeypairRetired, KeypairExpired, HandshakeCompleted on confirmation): C gets
        those peers' sessions, endpoints and pending indices now."""
        keys: set[bytes] = set()
        for ev in out.events:
            key = getattr(ev, "peer_key", None)
            if isinstance(key, bytes):
                keys.add(key)
        if not keys:
            return
        for key in keys:
            self._sync_peer(key)
        self._push_pending()

    def _sync_peer(self, key: bytes) -> None:
        peer = self.core.peers.get(key)
        pid = self._ids.get(key)
        if peer is None:
            if pid is not None:  # removed from the core
                del self._ids[key]
                self.c.remove_peer(pid)
                self._forget_keypairs(pid)
                self._endpoints.pop(pid, None)
                self._sources.pop(pid, None)
                self._stats.pop(pid, None)
                self._free.append(pid)
            self._pending_of.pop(key, None)
            return
        if pid is None:
            if not self._free and self._next_id >= self.c.max_peers:
                # the device refuses more peers than this at UAPI time
                self._own_drops["too_many_peers"] += 1
                return
            pid = self._free.pop() if self._free else self._take_id()
            self._ids[key] = pid
            self.c.add_peer(pid)
            self._stats[pid] = (0, 0, 0.0, 0.0, 0.0, 0.0)
            self._endpoints[pid] = None
        if peer.endpoint != self._endpoints.get(pid):
            try:
                self.c.set_endpoint(pid, peer.endpoint)
            except (OSError, ValueError, OverflowError):
                # e.g. its zone's interface is gone: C has no endpoint for it
                self.c.set_endpoint(pid, None)
                self._own_drops["endpoint_unusable"] += 1
            self._endpoints[pid] = peer.endpoint
            self._sources.pop(pid, None)
        # the core may have heard from this peer first (handshake, first data):
        # C must answer from the same local address the Python path would use
        local = self.py.sources.get(peer.endpoint) if peer.endpoint else None
        if local is not None and local != self._sources.get(pid):
            self.c.set_source(pid, local)
            self._sources[pid] = local
        self._mirror_keypairs(pid, peer)
        # data for sessions only the core runs (a responder's before its first
        # packet) must reach it; data on any other index C does not know is dropped
        pending = frozenset(
            kp.local_index for kp in peer.keypairs.all() if id(kp) not in self._installed
        )
        if pending:
            self._pending_of[key] = pending
        else:
            self._pending_of.pop(key, None)

    def _push_pending(self) -> None:
        pending = frozenset().union(*self._pending_of.values())
        if pending != self._pending:
            self.c.set_pending(pending)
            self._pending = pending

    def _take_id(self) -> int:
        pid = self._next_id
        if pid >= self.c.max_peers:
            raise RuntimeError("too many peers for the fast path")
        self._next_id += 1
        return pid

    def _mirror_keypairs(self, pid: int, peer: Any) -> None:
        want = (peer.keypairs.current, peer.keypairs.previous)
        have = self._keypairs.get(pid, (None, None))
        if want[0] is not have[0] or want[1] is not have[1]:
            mirrors = [self._mirror(kp) if kp is not None else None for kp in want]
            self.c.set_keypairs(pid, *(m.c_kp if m is not None else None for m in mirrors))
            for old in have:
                if old is not None and old is not want[0] and old is not want[1]:
                    self._drop_mirror(old)
            self._keypairs[pid] = want

    def _mirror(self, kp: Any) -> _Installed:
        m = self._installed.get(id(kp))
        if m is None or m.core_kp is not kp:
            m = _Installed(kp)
            self._installed[id(kp)] = m
            self._by_local[kp.local_index] = m
        return m

    def _drop_mirror(self, kp: Any) -> None:
        m = self._installed.pop(id(kp), None)
        if m is None:
            return
        if self._by_local.get(kp.local_index) is m:
            del self._by_local[kp.local_index]

    def _forget_keypairs(self, pid: int) -> None:
        for kp in self._keypairs.pop(pid, (None, None)):
            if kp is not None:
                self._drop_mirror(kp)
