"""The userspace WireGuard device: one event loop around the sans-I/O core.

It owns the TUN interface, the UDP sockets (v4 and v6 on one port), the UAPI
socket and the core. A data path (`fastloop.FastDataPath`, the C loop, or
`pypath.PyDataPath`) moves data packets; this module does everything else: UAPI
get/set, binding, the handshake queue and its "under load" signal, the timer, and
noticing when the link or the UAPI socket is removed so the daemon can stop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter, deque
from typing import Any

from . import netutil
from .core import WireGuardCore, short_key
from .datapath import DataPath, make_datapath
from .netutil import Address
from .peer import MAX_PEERS
from .tun import Tun
from .uapi import (
    EADDRINUSE,
    EINVAL,
    EIO,
    UNSET,
    DeviceInfo,
    PeerInfo,
    SetRequest,
    UapiError,
    format_get,
)
from .uapisock import serve, socket_identity, socket_path

log = logging.getLogger("kubespan_dp.device")

HANDSHAKE_QUEUE = 1024  # as wireguard-go's QueueHandshakeSize
UNDER_LOAD_QUEUE = HANDSHAKE_QUEUE // 8
UNDER_LOAD_AFTER = 1.0  # stay "under load" this long after the backlog clears
HANDSHAKE_BUDGET = 32  # handshakes per loop turn, so data keeps flowing
WATCH_INTERVAL = 0.5  # how often to check that link and socket still exist


class Device:
    def __init__(
        self,
        tun: Tun,
        uapi_sock: socket.socket,
        uapi_id: tuple[int, int] | None,
        core: WireGuardCore | None = None,
    ) -> None:
        """`uapi_id` is the socket file's identity taken right after binding it, so
        a removal before we got here is still noticed."""
        self.tun = tun
        self.ifname = tun.name
        self.uapi_sock = uapi_sock
        self.uapi_path = socket_path(self.ifname)
        self.uapi_id = uapi_id
        self.core = core or WireGuardCore()
        self.requested_port = 0
        self.port = 0
        self.fwmark = 0
        self.sock4, self.sock6, self.port = netutil.bind_pair(0, 0)
        self.path: DataPath = make_datapath(
            self.core,
            tun.fd,
            self._on_handshake,
            self._arm_timer,
            lambda: self.stop("the link was deleted"),
            offload_flags=getattr(tun, "offload_flags", 0),  # (stand-ins without: plain)
        )
        self.path.rebind(self.sock4, self.sock6)
        self.handshakes: deque[tuple[bytes, Address]] = deque()
        self.dropped: Counter[str] = Counter()
        self._under_load_until = 0.0
        self._draining = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._stopped: asyncio.Future[str] | None = None
        self._early_stop: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> str:
        """Serve until stopped; return why. Cleans up everything it owns."""
        self.loop = asyncio.get_running_loop()
        self._stopped = self.loop.create_future()
        if self._early_stop is not None:
            self._stopped.set_result(self._early_stop)
        server = await serve(self.uapi_sock, self)
        self.path.attach(self.loop)
        watcher = self.loop.create_task(self._watch())
        log.info("interface %s is up, listening on UDP port %d", self.ifname, self.port)
        try:
            reason = await self._stopped
        finally:
            watcher.cancel()
            server.close()
            self._close()
        log.info("interface %s stopped: %s", self.ifname, reason)
        return reason

    def stop(self, reason: str) -> None:
        if self._stopped is None:
            self._early_stop = self._early_stop or reason
        elif not self._stopped.done():
            self._stopped.set_result(reason)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if not self.tun.exists():
                self.stop("the link was deleted")
                continue
            try:
                mtu = self.tun.mtu
            except OSError:
                continue
            if mtu != self.core.mtu:  # padding is capped at the link MTU
                self.core.mtu = mtu
            elif self.uapi_id is None or socket_identity(self.uapi_path) != self.uapi_id:
                self.stop("the UAPI socket was removed")

    def _close(self) -> None:
        self.path.detach()
        if self._timer is not None:
            self._timer.cancel()
        for sock in (self.sock4, self.sock6):
            if sock is not None:
                sock.close()
        # only remove the socket file if it is still ours (not a successor's)
        if socket_identity(self.uapi_path) == self.uapi_id:
            try:
                self.uapi_path.unlink()
            except FileNotFoundError:
                pass
        self.uapi_sock.close()
        self.tun.close()  # the link goes away with the last fd

    # ------------------------------------------------------------------ timer

    def _arm_timer(self) -> None:
        deadline = self.core.next_deadline()
        if deadline == self._deadline or self.loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline = deadline
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._deadline = None
        try:
            self.path.emit(self.core.on_timer(time.monotonic()))
        except Exception:  # a bug: counted and logged, the timer keeps running
            self._internal_error("timer")
        finally:
            self._arm_timer()

    def _internal_error(self, where: str) -> None:
        """A callback failed on one item: count it, log it, and carry on."""
        self.dropped[f"internal_error_{where}"] += 1
        log.exception("internal error in %s (the daemon carries on)", where)

    # ------------------------------------------------------------------ handshakes

    def _on_handshake(self, data: bytes, source: Address, now: float) -> None:
        if len(self.handshakes) >= HANDSHAKE_QUEUE:
            self.dropped["handshake_queue_full"] += 1
            return
        self.handshakes.append((data, source))
        if not self._draining and self.loop is not None:
            self._draining = True
            self.loop.call_soon(self._drain_handshakes)

    def _drain_handshakes(self) -> None:
        # Whatever happens to one handshake, the next ones are processed: each item
        # is contained, and the loop is re-armed (or the flag reset) on every path.
        try:
            now = time.monotonic()
            # under load: measured on the handshake path's own bounded queues
            backlog = len(self.handshakes) + self.path.handshake_backlog()
            if backlog >= UNDER_LOAD_QUEUE:
                self._under_load_until = now + UNDER_LOAD_AFTER
            self.core.under_load = now < self._under_load_until
            for _ in range(min(HANDSHAKE_BUDGET, len(self.handshakes))):
                data, source = self.handshakes.popleft()
                try:
                    self.path.emit(self.core.receive_datagram(data, source, now))
                except Exception:
                    self._internal_error("handshake")
            self._arm_timer()
        except Exception:
            self._internal_error("handshake_queue")
        finally:
            if self.handshakes and self.loop is not None:
                self.loop.call_soon(self._drain_handshakes)
            else:
                self._draining = False

    # ------------------------------------------------------------------ UAPI

    def uapi_get(self) -> str:
        core = self.core
        mono_ns, wall_ns = time.monotonic_ns(), time.time_ns()
        peers = []
        for key, peer in core.peers.items():
            lh = peer.last_handshake
            lh_wall = 0 if lh is None else wall_ns - (mono_ns - int(lh * 1e9))
            peers.append(
                PeerInfo(
                    public_key=key,
                    preshared_key=peer.preshared_key,
                    endpoint=peer.endpoint,
                    last_handshake_ns=max(0, lh_wall),
                    tx_bytes=peer.tx_bytes,
                    rx_bytes=peer.rx_bytes,
                    persistent_keepalive=peer.persistent_keepalive,
                    allowed_ips=list(peer.allowed_ips),
                )
            )
        return format_get(DeviceInfo(core.private_key, self.port, self.fwmark, peers))

    def uapi_stats(self) -> str:
        counts = Counter(self.core.dropped) + self.dropped + self.path.dropped
        lines = [f"dropped_{reason}={n}" for reason, n in sorted(counts.items())]
        lines.append(f"handshake_queue={len(self.handshakes)}")
        return "".join(line + "\n" for line in lines)

    def uapi_set(self, req: SetRequest) -> None:
        self._check_peer_count(req)
        self._apply_binding(req)  # the only step that can fail: first, all or nothing
        try:
            self._apply_config(req)
        except Exception as e:  # a bug, not bad input (that was rejected by parsing)
            log.exception("applying a UAPI set failed")
            raise UapiError(EIO, f"internal error: {type(e).__name__}") from None
        finally:
            # allowed IPs (and peers) may have changed: the path applies them now
            try:
                self.path.routes_changed()
            except Exception:
                self._internal_error("routes")
        self._arm_timer()

    def _check_peer_count(self, req: SetRequest) -> None:
        """Refuse (nothing applied) a request that would leave more than MAX_PEERS."""
        keys = set() if req.replace_peers else set(self.core.peers)
        for p in req.peers:
            if p.remove:
                keys.discard(p.public_key)
            elif not p.update_only or p.public_key in keys:
                keys.add(p.public_key)
        if self.core.public_key is not None:
            keys.discard(self.core.public_key)
        if len(keys) > MAX_PEERS:
            raise UapiError(EINVAL, f"too many peers: at most {MAX_PEERS}")

    def _apply_binding(self, req: SetRequest) -> None:
        port = self.requested_port if req.listen_port is UNSET else req.listen_port
        mark = self.fwmark if req.fwmark is UNSET else req.fwmark
        if port != self.requested_port and not (port != 0 and port == self.port):
            try:
                sock4, sock6, actual = netutil.bind_pair(port, mark)
            except OSError as e:
                raise UapiError(EADDRINUSE, f"cannot listen on port {port}: {e.strerror}") from None
            old = (self.sock4, self.sock6)
            self.sock4, self.sock6, self.port = sock4, sock6, actual
            self.path.rebind(sock4, sock6)
            for s in old:
                if s is not None:
                    s.close()
            log.info("listening on UDP port %d", actual)
        elif mark != self.fwmark:
            done = []
            try:
                for s in (self.sock4, self.sock6):
                    if s is not None:
                        netutil.set_mark(s, mark)
                        done.append(s)
            except OSError as e:
                for s in done:
                    netutil.set_mark(s, self.fwmark)
                raise UapiError(EADDRINUSE, f"cannot set fwmark: {e.strerror}") from None
        self.requested_port = port
        if mark != self.fwmark:
            log.info("fwmark set to %#x", mark)
        self.fwmark = mark

    def _apply_config(self, req: SetRequest) -> None:
        core = self.core
        now = time.monotonic()
        if req.private_key is not UNSET:
            core.set_private_key(req.private_key, now)
            log.info("private key %s", "set" if req.private_key else "cleared")
        if req.replace_peers and core.peers:
            core.remove_all_peers()
            log.info("removed all peers")
        for p in req.peers:
            if p.public_key == core.public_key:
                continue  # our own key: ignored, as wireguard-go does
            exists = p.public_key in core.peers
            if p.remove:
                if exists:
                    core.remove_peer(p.public_key)
                    log.info("peer %s removed", short_key(p.public_key))
                continue
            if p.update_only and not exists:
                continue
            kwargs: dict[str, Any] = {}
            if p.preshared_key is not UNSET:
                kwargs["preshared_key"] = p.preshared_key
            if p.endpoint is not UNSET:
                kwargs["endpoint"] = p.endpoint
            if p.persistent_keepalive is not UNSET:
                kwargs["persistent_keepalive"] = p.persistent_keepalive
            if p.allowed_ip_changes:  # in order, replace_allowed_ips included
                kwargs["allowed_ip_changes"] = p.allowed_ip_changes
            core.set_peer(p.public_key, now, **kwargs)
            if not exists:
                log.info("peer %s added", short_key(p.public_key))
