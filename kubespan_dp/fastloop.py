"""The fast packet path: the C `PacketLoop` moves data packets; the core decides.

A drop-in for `pypath.PyDataPath` (same constructor and methods; see that module
for the contract with the device).  Division of labour:

- C threads (in `_fastpath.pyx`) read TUN, seal, sendmmsg; recvmmsg, open, check
  replay and source, write TUN — for every keypair the core has *confirmed*.
- Everything else reaches Python through the loop's slow queue and goes to the core
  unchanged: handshake and cookie messages (via the device's handshake queue), data
  on indices C does not know (the responder's first packet on a fresh keypair), and
  packets for peers without a usable session.

The core stays the single source of truth, and its output's events are the seam:
KeypairInstalled / KeypairConfirmed / KeypairRetired / KeypairExpired move keypairs
between a peer's slots (this module keeps a copy, `_Slots`, and never reads the
core's), EndpointChanged carries a roam the core saw.  Before that output's datagrams
leave, C has the touched peers' confirmed keypairs, the indices of sessions only the
core runs, and the new endpoints.  Configuration (peers, configured endpoints,
allowed IPs, MTU) is walked after each UAPI set and on a short tick.  C's activity
goes back to the core (byte counters, roamed endpoints, and the timer hooks
wireguard-go calls on data sent/received), so keepalives, rekeys and expiry work as
in the pure-Python path.

One owner per session: once a keypair is in C, C owns its send counter and its
receive window.  The core's keypair hands both over (`Keypair.hand_counter_to`,
`hand_window_to`): whatever the core seals on it later (a keepalive from a timer,
staged packets) takes its counter from C atomically, and whatever data the core
still opens on it (queued for Python before the hand-over) is checked and recorded
in C's window, under the loop's lock; so no counter is used twice on the wire and
none is accepted twice.  Sessions are only ever found by our own index (the
receiver field of what peers send us), never by the index a peer chose.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from . import _fastpath as fp
from .core import short_key
from .datapath import fastpath_enabled
from .keypair import (
    EndpointChanged,
    Keypair,
    KeypairConfirmed,
    KeypairExpired,
    KeypairInstalled,
    KeypairRetired,
)
from .netutil import Address
from .peer import MAX_PEERS
from .pypath import MAX_SOURCES, PyDataPath
from .tun import UDP_OFFLOADS

SYNC_INTERVAL = 0.1  # seconds between C -> core activity syncs
HANDSHAKE_SIZES = {1: 148, 2: 92}  # initiation, response (cookie replies need no DH)
HANDSHAKE_BATCH = 1024  # handshake messages taken from C per wakeup

log = logging.getLogger("kubespan_dp.fastloop")


__all__ = ["FastDataPath", "fastpath_enabled"]


class _CWindow:
    """C's receive window of a keypair, for the core (`keypair.ReceiveWindow`): both
    calls take the loop's write lock, so the receiving thread never runs beside them."""

    __slots__ = ("loop", "c_kp")

    def __init__(self, loop: fp.PacketLoop, c_kp: fp.Keypair) -> None:
        self.loop, self.c_kp = loop, c_kp

    def check(self, counter: int) -> bool:
        return 0 <= counter < 1 << 64 and self.loop.replay_check(self.c_kp, counter)

    def update(self, counter: int) -> bool:
        return 0 <= counter < 1 << 64 and self.loop.replay_update(self.c_kp, counter)


class _Installed:
    """A core keypair mirrored in C: C owns its send counter and receive window."""

    __slots__ = ("core_kp", "c_kp")

    def __init__(self, core_kp: Keypair, loop: fp.PacketLoop) -> None:
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
        # the core's window, the only one so far, moves to C as it stands
        self.c_kp.load_replay(*core_kp.replay.state())
        # from now on C alone hands out this session's counters and decides which
        # counters it accepts, for C and for the core
        core_kp.hand_counter_to(self.c_kp)
        core_kp.hand_window_to(_CWindow(loop, self.c_kp))


class _Slots:
    """A peer's keypair slots as the core's events described them (`Keypairs`)."""

    __slots__ = ("current", "previous", "next")

    def __init__(self) -> None:
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None

    def all(self) -> list[Keypair]:
        return [k for k in (self.current, self.previous, self.next) if k is not None]

    def empty(self) -> bool:
        return not self.all()

    def retire(self, local_index: int) -> None:
        if self.current is not None and self.current.local_index == local_index:
            self.current = None
        if self.previous is not None and self.previous.local_index == local_index:
            self.previous = None
        if self.next is not None and self.next.local_index == local_index:
            self.next = None


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
        self._peer: dict[int, Any] = {}  # C slot -> the core's Peer it stands for
        self._slots: dict[bytes, _Slots] = {}  # peer public key -> its keypairs
        self._keypairs: dict[int, tuple[Any, Any]] = {}  # slot -> core (current, previous)
        self._installed: dict[int, _Installed] = {}  # id(core keypair) -> mirror
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
            # data on a session the core runs (or ran when C queued it): the core
            # decides, through the session's one receive window
            self._send_output(core.receive_datagram(data, source, now))

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
        """Make the C loop's peers, configured endpoints and routes match the core.

        Runs on attach, after each UAPI set and on the tick.  Sessions are not
        compared here: they reach C only from the core's events (`_apply_events`).
        Routes are compared only when asked: walking every peer's allowed IPs is
        the costly part.
        """
        core = self.core
        if core.mtu != self._mtu:  # the device follows the link MTU
            self.c.set_mtu(core.mtu)
            self._mtu = core.mtu
        # gone, or removed and added again (a new peer with the same key: its slot
        # and slots copy start empty, as the device reconciles right after a UAPI
        # set, before the new peer can have a session)
        for key in [k for k, pid in self._ids.items() if core.peers.get(k) is not self._peer[pid]]:
            self._remove_peer(key)
        for key, peer in core.peers.items():
            pid = self._ensure_peer(key)
            if pid is None:
                continue
            if peer.endpoint != self._endpoints.get(pid):
                self._set_endpoint(pid, peer.endpoint)
            else:
                self._set_source(pid, peer.endpoint)
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
        """The core's events, in order, move keypairs between each peer's slots (our
        copy in `_slots`); C then gets the touched peers' (current, previous) and
        the indices of sessions only the core runs.  A roamed endpoint reaches C
        at once."""
        touched: set[bytes] = set()
        for ev in out.events:
            if isinstance(ev, EndpointChanged):
                pid = self._ids.get(ev.peer_key)
                if pid is not None:
                    self._set_endpoint(pid, ev.endpoint, force=True)
                continue
            slots = self._slots.get(ev.peer_key)
            if isinstance(ev, KeypairInstalled):
                slots = self._slots.setdefault(ev.peer_key, _Slots())
                if ev.confirmed:
                    slots.current, slots.next = ev.keypair, None
                else:
                    slots.next = ev.keypair
                slots.previous = ev.previous
            elif isinstance(ev, KeypairConfirmed) and slots is not None:
                slots.current, slots.previous, slots.next = ev.keypair, ev.previous, None
            elif isinstance(ev, KeypairRetired) and slots is not None:
                slots.retire(ev.local_index)
            elif isinstance(ev, KeypairExpired) and slots is not None:
                for kp in (slots.current, slots.next):
                    m = self._installed.get(id(kp))
                    if kp is not None and kp.local_index == ev.local_index and m is not None:
                        m.c_kp.expire()  # the core's counter setter did too: idempotent
            else:
                continue
            touched.add(ev.peer_key)
        for key in touched:
            self._push_sessions(key)
        if touched:
            self._push_pending()

    def _push_sessions(self, key: bytes) -> None:
        """C runs the peer's confirmed keypairs; the core keeps the rest (pending)."""
        slots = self._slots.get(key)
        if slots is not None and slots.empty():
            del self._slots[key]
            slots = None
        pid = self._ids.get(key)
        if pid is None:
            pid = self._ensure_peer(key)  # (which pushes the sessions itself)
            if pid is None:
                # no C slot for it: the core keeps all its sessions
                pending = frozenset(kp.local_index for kp in slots.all()) if slots else None
                self._set_pending_of(key, pending)
            return
        self._set_source(pid, self._endpoints.get(pid))
        self._mirror_keypairs(pid, (slots.current, slots.previous) if slots else (None, None))
        # data for sessions only the core runs (a responder's before its first
        # packet) must reach it; data on any other index C does not know is dropped
        nxt = slots.next if slots else None
        self._set_pending_of(key, frozenset((nxt.local_index,)) if nxt is not None else None)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "peer %s: fast path runs sessions %s, the core's pending one %s",
                short_key(key),
                [kp.local_index if kp else None for kp in self._keypairs.get(pid, (None, None))],
                nxt.local_index if nxt is not None else None,
            )

    def _set_pending_of(self, key: bytes, pending: frozenset[int] | None) -> None:
        if pending:
            self._pending_of[key] = pending
        else:
            self._pending_of.pop(key, None)

    def _ensure_peer(self, key: bytes) -> int | None:
        """The peer's C slot, made (with its sessions) if the core has the peer."""
        pid = self._ids.get(key)
        peer = self.core.peers.get(key)
        if pid is not None or peer is None:
            return pid
        if not self._free and self._next_id >= self.c.max_peers:
            # the device refuses more peers than this at UAPI time
            self._own_drops["too_many_peers"] += 1
            return None
        pid = self._free.pop() if self._free else self._take_id()
        self._ids[key] = pid
        self._peer[pid] = peer
        self.c.add_peer(pid)
        self._stats[pid] = (0, 0, 0.0, 0.0, 0.0, 0.0)
        self._endpoints[pid] = None
        self._set_endpoint(pid, peer.endpoint)
        if key in self._slots:
            self._push_sessions(key)
        return pid

    def _remove_peer(self, key: bytes) -> None:
        pid = self._ids.pop(key)
        self.c.remove_peer(pid)
        self._forget_keypairs(pid)
        for table in (self._endpoints, self._sources, self._stats, self._peer):
            table.pop(pid, None)
        self._free.append(pid)
        self._slots.pop(key, None)
        self._pending_of.pop(key, None)

    def _set_endpoint(self, pid: int, endpoint: Address | None, force: bool = False) -> None:
        # forced for a roam the core saw: C may have roamed elsewhere since our push
        if force or endpoint != self._endpoints.get(pid):
            try:
                self.c.set_endpoint(pid, endpoint)
            except (OSError, ValueError, OverflowError):
                # e.g. its zone's interface is gone: C has no endpoint for it
                self.c.set_endpoint(pid, None)
                self._own_drops["endpoint_unusable"] += 1
            self._endpoints[pid] = endpoint
            self._sources.pop(pid, None)  # C forgot it with the old endpoint
        self._set_source(pid, endpoint)

    def _set_source(self, pid: int, endpoint: Address | None) -> None:
        # the core may have heard from this peer first (handshake, first data):
        # C must answer from the same local address the Python path would use
        local = self.py.sources.get(endpoint) if endpoint else None
        if local is not None and local != self._sources.get(pid):
            self.c.set_source(pid, local)
            self._sources[pid] = local

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

    def _mirror_keypairs(self, pid: int, want: tuple[Any, Any]) -> None:
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
            m = _Installed(kp, self.c)
            self._installed[id(kp)] = m
        return m

    def _drop_mirror(self, kp: Any) -> None:
        m = self._installed.get(id(kp))
        if m is not None and m.core_kp is kp:
            del self._installed[id(kp)]

    def _forget_keypairs(self, pid: int) -> None:
        for kp in self._keypairs.pop(pid, (None, None)):
            if kp is not None:
                self._drop_mirror(kp)
