"""The packet path in pure Python: TUN <-> core <-> UDP.

This class is the one piece the Cython fast path replaces. Its contract with the
device (`device.py`):

- `attach(loop)` / `detach()` register and remove the fd readers;
- `rebind(sock4, sock6)` swaps the UDP sockets (listen port or fwmark change);
- `emit(output)` sends a core `Output` (timers, handshakes, UAPI changes use it);
- it hands handshake-type datagrams to `on_handshake(data, source, now)` instead of
  the core, so the device can queue them and measure load;
- it calls `on_batch()` after each batch, so the device can re-arm the timer,
  and `on_link_gone()` if the TUN link disappears.

Every readiness callback drains up to BATCH packets: one event-loop wakeup per
burst, not per packet.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable

from .netutil import CMSG_SPACE, Address, local_from_ancillary, source_cmsg
from .tun import VNET_HDR_LEN

BATCH = 64
MAX_DATAGRAM = 65535
MAX_SOURCES = 4096
# handshake-type messages and their only valid sizes (initiation, response, cookie)
HANDSHAKE_SIZES = {1: 148, 2: 92, 3: 64}
HANDSHAKE_TYPES = frozenset(HANDSHAKE_SIZES)
log = logging.getLogger("kubespan_dp.pypath")
_STICKY_ERRORS = frozenset((errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH))


class PyDataPath:
    def __init__(
        self,
        core: object,
        tun_fd: int,
        on_handshake: Callable[[bytes, Address, float], None],
        on_batch: Callable[[], None],
        on_link_gone: Callable[[], None],
        vnet_hdr: bool = False,
    ) -> None:
        self.core = core
        self.tun_fd = tun_fd
        # the TUN has IFF_VNET_HDR (the C loop reads it): each write starts with a
        # virtio_net_hdr, all zero for a plain packet.  Reading such a TUN is the C
        # loop's job (super-packets), never this path's.
        self._tun_prefix = bytes(VNET_HDR_LEN) if vnet_hdr else b""
        self.sock4: socket.socket | None = None
        self.sock6: socket.socket | None = None
        self.on_handshake = on_handshake
        self.on_batch = on_batch
        self.on_link_gone = on_link_gone
        self.loop: asyncio.AbstractEventLoop | None = None
        # remote address -> (packed local address, ifindex) it last wrote to
        self.sources: dict[Address, tuple[bytes, int]] = {}
        self.dropped: Counter[str] = Counter()

    # ------------------------------------------------------------- wiring

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._tun_prefix:
            raise ValueError("the pure-Python path reads a TUN without offloads only")
        self.loop = loop
        loop.add_reader(self.tun_fd, self._on_tun)
        self._watch_sockets(True)

    def detach(self) -> None:
        if self.loop is None:
            return
        self.loop.remove_reader(self.tun_fd)
        self._watch_sockets(False)
        self.loop = None

    def rebind(self, sock4: socket.socket | None, sock6: socket.socket | None) -> None:
        if self.loop is not None:
            self._watch_sockets(False)
        self.sock4, self.sock6 = sock4, sock6
        self.sources.clear()  # cached local addresses belong to the old sockets
        if self.loop is not None:
            self._watch_sockets(True)

    def _watch_sockets(self, on: bool) -> None:
        assert self.loop is not None
        for sock in (self.sock4, self.sock6):
            if sock is None:
                continue
            if on:
                self.loop.add_reader(sock.fileno(), self._on_udp, sock)
            else:
                self.loop.remove_reader(sock.fileno())

    def routes_changed(self) -> None:
        """The core routes every packet itself: nothing to apply."""

    def handshake_backlog(self) -> int:
        """Handshakes waiting before the device's queue: none on this path."""
        return 0

    # ------------------------------------------------------------- outbound

    def emit(self, out: object) -> None:
        for data, addr in out.datagrams:  # type: ignore[attr-defined]
            if data[:1] == b"\x01":
                self.clear_source_on_retry(addr)
            self.send(data, addr)
        if out.packets:  # type: ignore[attr-defined]
            self._write_tun(out.packets)  # type: ignore[attr-defined]

    def clear_source_on_retry(self, addr: Address) -> bool:
        """Before a retried initiation, forget the local address we answered `addr`
        from (wireguard-go timers.go clears the endpoint's source on retransmit): a
        source that still exists but no longer routes is never used again.  True if
        a sticky source was forgotten."""
        if addr not in self.sources:
            return False
        for peer in self.core.peers.values():  # type: ignore[attr-defined]
            if peer.endpoint == addr and peer.timers.handshake_attempts > 0:
                del self.sources[addr]
                return True
        return False

    def send(self, data: bytes, addr: Address) -> None:
        sock = self.sock6 if ":" in addr[0] else self.sock4
        if sock is None:
            self.dropped["no_socket_for_family"] += 1
            return
        local = self.sources.get(addr)
        try:
            if local is None:
                sock.sendto(data, addr)
            else:
                sock.sendmsg([data], source_cmsg(local), 0, addr)
            return
        except BlockingIOError:
            self.dropped["udp_send_buffer_full"] += 1
            return
        except OSError as e:
            if local is None or e.errno not in _STICKY_ERRORS:
                code = e.errno or 0
                self.dropped[f"udp_send_{errno.errorcode.get(code, code)}"] += 1
                return
        # the local address we used to answer from is gone: let the kernel pick
        self.sources.pop(addr, None)
        try:
            sock.sendto(data, addr)
        except OSError:
            self.dropped["udp_send_failed"] += 1

    def _write_tun(self, packets: list[bytes]) -> None:
        prefix = self._tun_prefix
        for packet in packets:
            try:
                if prefix:
                    os.writev(self.tun_fd, (prefix, packet))
                else:
                    os.write(self.tun_fd, packet)
            except BlockingIOError:
                self.dropped["tun_write_full"] += 1
            except OSError as e:
                if e.errno in (errno.EBADFD, errno.EBADF, errno.EIO):
                    self.on_link_gone()
                    return
                self.dropped["tun_write_error"] += 1

    # ------------------------------------------------------------- inbound

    def _on_tun(self) -> None:
        core_send = self.core.send_packet  # type: ignore[attr-defined]
        emit = self.emit
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                packet = os.read(self.tun_fd, MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in (errno.EBADFD, errno.EBADF, errno.EIO, errno.ENXIO):
                    self.on_link_gone()
                    return
                raise
            if not packet:
                break
            try:
                emit(core_send(packet, now))
            except Exception:  # a bug: counted and logged, the reader stays
                self._internal_error("tun_packet")
        self._after_batch()

    def _internal_error(self, where: str) -> None:
        self.dropped[f"internal_error_{where}"] += 1
        log.exception("internal error in %s (the packet path carries on)", where)

    def _after_batch(self) -> None:
        try:
            self.on_batch()
        except Exception:
            self._internal_error("batch")

    def _on_udp(self, sock: socket.socket) -> None:
        core_receive = self.core.receive_datagram  # type: ignore[attr-defined]
        emit = self.emit
        sources = self.sources
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                data, anc, _flags, raw = sock.recvmsg(MAX_DATAGRAM, CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # e.g. ICMP port unreachable reported on the socket: nothing to do
                self.dropped["udp_receive_error"] += 1
                continue
            source: Address = (
                raw[0] if len(raw) == 2 or not raw[3] else f"{raw[0]}%{raw[3]}",
                raw[1],
            )
            local = local_from_ancillary(anc)
            if local is not None and sources.get(source) != local:
                if len(sources) >= MAX_SOURCES:
                    sources.clear()  # bounded: garbage senders cannot grow it
                sources[source] = local
            try:
                if data and data[0] in HANDSHAKE_SIZES and len(data) == HANDSHAKE_SIZES[data[0]]:
                    self.on_handshake(data, source, now)
                elif data and data[0] in HANDSHAKE_SIZES:
                    self.dropped["invalid_size"] += 1  # as wireguard-go's receive.go
                else:
                    emit(core_receive(data, source, now))
            except Exception:
                self._internal_error("datagram")
        self._after_batch()
