"""Nothing stops the loop: a failure in one event-loop callback item is counted,
logged and contained; the callback is re-armed.  And UAPI requests that could only
fail half-way are refused whole (EINVAL, nothing applied).

No namespaces and no root: the device runs on a pipe instead of a TUN device and
its callbacks are driven by hand on a private event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any

import pytest

from kubespan_dp import _fastpath as fp
from kubespan_dp import crypto, device, uapi
from kubespan_dp.core import Output, WireGuardCore
from kubespan_dp.device import Device
from kubespan_dp.fastloop import FastDataPath
from kubespan_dp.uapi import UapiError, parse_set

SRC = ("10.0.0.2", 51820)


@dataclass
class FakeTun:
    name: str
    fd: int

    def exists(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _key(n: int) -> bytes:
    return crypto.clamp(bytes([n]) * 32)


def _pub(n: int) -> bytes:
    return crypto.public_key(_key(n))


@pytest.fixture(params=["python", "c"])
def dev(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Device]:
    monkeypatch.setenv("KUBESPAN_WG_FASTPATH", "1" if request.param == "c" else "0")
    r, w = os.pipe()
    uapi_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    d = Device(FakeTun(f"kst{os.getpid() % 10000}", w), uapi_sock, None, WireGuardCore(_key(1)))  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    d.loop = loop
    yield d
    for s in (d.sock4, d.sock6):
        if s is not None:
            s.close()
    uapi_sock.close()
    loop.close()
    os.close(r)
    os.close(w)


def _run_until(loop: asyncio.AbstractEventLoop, cond: Callable[[], bool], what: str) -> None:
    async def wait() -> None:
        deadline = time.monotonic() + 5
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0)

    loop.run_until_complete(wait())


def test_a_failing_handshake_does_not_stall_the_queue(dev: Device) -> None:
    seen: list[bytes] = []
    real = dev.core.receive_datagram

    def receive(data: bytes, source: Any, now: float) -> Output:
        seen.append(data)
        if data == b"boom":
            raise RuntimeError("a bug in the core")
        return real(data, source, now)

    dev.core.receive_datagram = receive  # type: ignore[method-assign]
    assert dev.loop is not None
    for data in (b"boom", b"after"):
        dev._on_handshake(data, SRC, time.monotonic())
    _run_until(dev.loop, lambda: not dev._draining, "the queue to drain")
    assert seen == [b"boom", b"after"]
    assert dev.dropped["internal_error_handshake"] == 1
    dev._on_handshake(b"later", SRC, time.monotonic())  # a new drain is scheduled
    _run_until(dev.loop, lambda: seen[-1:] == [b"later"], "the next handshake")
    assert "dropped_internal_error_handshake=1" in dev.uapi_stats()


def test_a_failing_timer_is_rearmed(dev: Device) -> None:
    calls = []

    def on_timer(now: float) -> Output:
        calls.append(now)
        raise RuntimeError("a bug in a timer")

    dev.core.on_timer = on_timer  # type: ignore[method-assign]
    dev.core.next_deadline = lambda: time.monotonic() + 0.01  # type: ignore[method-assign]
    dev._on_timer()
    assert dev.dropped["internal_error_timer"] == 1
    assert dev._timer is not None  # re-armed
    assert dev.loop is not None
    _run_until(dev.loop, lambda: len(calls) >= 2, "the timer to fire again")


def test_peer_limit_refused_whole(dev: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "MAX_PEERS", 3)
    dev.uapi_set(parse_set([f"public_key={_pub(n).hex()}" for n in (2, 3, 4)]))
    lines = [f"private_key={_key(9).hex()}", "listen_port=0"]
    lines += [f"public_key={_pub(n).hex()}" for n in (5, 6)]
    with pytest.raises(UapiError) as e:
        dev.uapi_set(parse_set(lines))
    assert e.value.errno == uapi.EINVAL
    assert len(dev.core.peers) == 3 and dev.core.private_key == _key(1)
    # removing one in the same request makes room
    ok = [f"public_key={_pub(2).hex()}", "remove=true", f"public_key={_pub(5).hex()}"]
    dev.uapi_set(parse_set(ok))
    assert set(dev.core.peers) == {_pub(n) for n in (3, 4, 5)}


def test_allowed_ip_removal(dev: Device) -> None:
    k = _pub(2).hex()
    dev.uapi_set(parse_set([f"public_key={k}", "allowed_ip=10.1.0.0/16", "allowed_ip=10.2.0.0/16"]))
    dev.uapi_set(parse_set([f"public_key={k}", "allowed_ip=-10.1.0.0/16"]))
    assert dev.core.peers[_pub(2)].allowed_ips == [ip_network("10.2.0.0/16")]
    assert "allowed_ip=10.1.0.0/16" not in dev.uapi_get()


def test_uapi_refuses_keys_with_whitespace_and_unknown_zones() -> None:
    spaced = "11" * 15 + " 1" + "11" * 16  # 64 characters, 31 bytes once whitespace goes
    for lines in (
        [f"private_key={spaced}"],
        [f"public_key={'22' * 32}", f"preshared_key={spaced}"],
        [f"public_key={spaced}"],
        [f"public_key={'22' * 32}", "endpoint=[fe80::1%nosuchif0]:51820"],
        [f"public_key={'22' * 32}", "endpoint=[fe80::1%4294967296]:51820"],
    ):
        with pytest.raises(UapiError) as e:
            parse_set(lines)
        assert e.value.errno == uapi.EINVAL, lines
    ok = parse_set([f"public_key={'22' * 32}", "endpoint=[fe80::1%lo]:51820"])
    assert ok.peers[0].endpoint == ("fe80::1%lo", 51820)


def test_allowed_ip_lines_kept_in_order() -> None:
    req = parse_set(
        [
            f"public_key={'22' * 32}",
            "allowed_ip=10.0.0.0/8",
            "allowed_ip=-10.0.0.0/8",
            "allowed_ip=-10.9.0.0/16",
            "allowed_ip=10.9.0.0/16",
        ]
    )
    (p,) = req.peers
    assert p.allowed_ip_changes == [
        (ip_network("10.0.0.0/8"), True),
        (ip_network("10.0.0.0/8"), False),
        (ip_network("10.9.0.0/16"), False),
        (ip_network("10.9.0.0/16"), True),
    ]


# ------------------------------------------------------------------ the C path's callbacks


class SlowQueue:
    """Stands in for the C loop's slow queue; everything else goes to the real loop."""

    def __init__(self, real: fp.PacketLoop, items: list[Any]) -> None:
        self.real = real
        self.items = items
        self.link_gone = False

    def take_slow(self, limit: int = 512) -> list[Any]:
        items, self.items = self.items, []
        return items

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
def fast() -> Iterator[tuple[FastDataPath, WireGuardCore, list[Any]]]:
    r, w = os.pipe()
    core = WireGuardCore(_key(1))
    queued: list[Any] = []
    path = FastDataPath(core, w, lambda d, s, n: queued.append(d), lambda: None, lambda: None)
    path.loop = asyncio.new_event_loop()
    yield path, core, queued
    path.loop.close()
    os.close(r)
    os.close(w)


def test_slow_path_item_failure_contained(
    fast: tuple[FastDataPath, WireGuardCore, list[Any]],
) -> None:
    path, core, queued = fast
    handled: list[bytes] = []

    def receive(data: bytes, source: Any, now: float) -> Output:
        handled.append(data)
        if data.startswith(b"\x04boom"):
            raise RuntimeError("a bug in the core")
        return Output()

    core.receive_datagram = receive  # type: ignore[method-assign]
    items = [(fp.SLOW_DATAGRAM, b"\x04boom" + bytes(40), SRC, -1, None)]
    items.append((fp.SLOW_DATAGRAM, b"\x04fine" + bytes(40), SRC, -1, None))
    path.c = SlowQueue(path.c, items)  # type: ignore[assignment]
    path._on_slow()
    assert len(handled) == 2
    assert path.dropped["internal_error_slow_item"] == 1


def test_tick_rearmed_after_a_failure(fast: tuple[FastDataPath, WireGuardCore, list[Any]]) -> None:
    path, core, _ = fast

    def broken(now: float) -> None:
        raise RuntimeError("a bug in sync")

    path.sync = broken  # type: ignore[method-assign]
    path._tick()
    assert path._tick_handle is not None
    assert path.dropped["internal_error_sync"] == 1


def test_unusable_zone_and_many_peers_reach_c(
    fast: tuple[FastDataPath, WireGuardCore, list[Any]],
) -> None:
    path, core, _ = fast
    core.set_peer(_pub(2), 0.0, endpoint=("fe80::1%nosuchif0", 51820))
    for n in range(1100):  # more than the old limit of 1024 C slots
        core.set_peer(hashlib.sha256(n.to_bytes(4, "little")).digest(), 0.0)
    path.reconcile()
    assert path.dropped["endpoint_unusable"] == 1
    assert len(path._ids) == len(core.peers) == 1101


def test_mtu_beyond_what_the_c_loop_carries_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubespan_dp import cli

    monkeypatch.setenv("KUBESPAN_WG_FASTPATH", "1")
    assert cli.max_mtu() == fp.MAX_PACKET < 9216
    # refused before any TUN device is made (no root needed to get here)
    assert cli.main(["-f", "--mtu", str(fp.MAX_PACKET + 1), "kstmtu0"]) == 2
    assert cli.main(["-f", "--mtu", "65535", "kstmtu0"]) == 2
    monkeypatch.setenv("KUBESPAN_WG_FASTPATH", "0")
    assert cli.max_mtu() == 65535 - 32


@pytest.mark.parametrize("fast", [False, True], ids=["python", "c"])
def test_sticky_source_cleared_on_handshake_retry(fast: bool) -> None:
    """wireguard-go clears the endpoint's source address on a retried initiation; a
    first initiation keeps it."""
    from kubespan_dp.pypath import PyDataPath

    r, w = os.pipe()
    core = WireGuardCore(_key(1))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    addr = ("127.0.0.1", sock.getsockname()[1])
    try:
        path: Any
        if fast:
            path = FastDataPath(core, w, lambda *a: None, lambda: None, lambda: None)
            sources = path.py.sources
        else:
            path = PyDataPath(core, w, lambda *a: None, lambda: None, lambda: None)
            sources = path.sources
        path.rebind(sock, None)
        peer = core.set_peer(_pub(2), 0.0, endpoint=addr)
        local = (socket.inet_aton("127.0.0.1"), 0)
        sources[addr] = local
        initiation = Output(datagrams=[(b"\x01" + bytes(147), addr)])
        path.emit(initiation)  # a first attempt
        assert sources.get(addr) == local
        peer.timers.handshake_attempts = 1
        path.emit(initiation)  # a retry
        assert addr not in sources
    finally:
        sock.close()
        os.close(r)
        os.close(w)


def test_routes_reach_c_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """A UAPI set's allowed IPs are in C at once, not on the next tick."""
    monkeypatch.setenv("KUBESPAN_WG_FASTPATH", "1")
    r, w = os.pipe()
    uapi_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    d = Device(FakeTun("kstroute0", w), uapi_sock, None, WireGuardCore(_key(1)))  # type: ignore[arg-type]
    try:
        d.uapi_set(parse_set([f"public_key={_pub(2).hex()}", "allowed_ip=10.55.0.0/16"]))
        assert isinstance(d.path, FastDataPath)
        probe = bytes([0x45]) + bytes(11) + socket.inet_aton("10.9.0.1")
        probe += socket.inet_aton("10.55.3.4")
        assert d.path.c.route(probe) == d.path._ids[_pub(2)]
        d.uapi_set(parse_set([f"public_key={_pub(2).hex()}", "allowed_ip=-10.55.0.0/16"]))
        assert d.path.c.route(probe) == -1
    finally:
        for s in (d.sock4, d.sock6):
            if s is not None:
                s.close()
        uapi_sock.close()
        os.close(r)
        os.close(w)


def test_pure_python_path_needs_no_extension() -> None:
    """With KUBESPAN_WG_FASTPATH=0 the daemon imports and builds its packet path
    without the compiled `_fastpath` module."""
    import subprocess
    import sys

    script = """
import os, sys
sys.modules["kubespan_dp._fastpath"] = None  # as if it were not built
os.environ["KUBESPAN_WG_FASTPATH"] = "0"
from kubespan_dp import cli, device
from kubespan_dp.core import WireGuardCore
from kubespan_dp.datapath import make_datapath
r, w = os.pipe()
path = make_datapath(WireGuardCore(), w, lambda *a: None, lambda: None, lambda: None)
print(type(path).__name__, cli.max_mtu())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PyDataPath", str(65535 - 32)]


def test_under_load_counts_the_paths_handshake_backlog(dev: Device) -> None:
    """Handshakes still waiting in C's own queue count for "under load", as
    wireguard-go measures its handshake queue: cookies engage under a flood."""
    assert dev.loop is not None
    dev.path.handshake_backlog = lambda: device.UNDER_LOAD_QUEUE  # type: ignore[method-assign]
    dev._on_handshake(b"x", SRC, time.monotonic())
    _run_until(dev.loop, lambda: not dev._draining, "the queue to drain")
    assert dev.core.under_load
    dev.path.handshake_backlog = lambda: 0  # type: ignore[method-assign]
    dev._under_load_until = 0.0
    dev._on_handshake(b"x", SRC, time.monotonic())
    _run_until(dev.loop, lambda: not dev._draining, "the queue to drain")
    assert not dev.core.under_load


def test_pure_python_path_queues_only_handshakes_of_the_right_size() -> None:
    from kubespan_dp.pypath import PyDataPath

    r, w = os.pipe()
    queued: list[bytes] = []
    path = PyDataPath(
        WireGuardCore(_key(1)), w, lambda d, s, n: queued.append(d), lambda: None, lambda: None
    )
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        good = [b"\x01" + bytes(147), b"\x02" + bytes(91), b"\x03" + bytes(63)]
        bad = [b"\x01" + bytes(99), b"\x02", b"\x03" + bytes(200)]
        for d in good + bad:
            tx.sendto(d, rx.getsockname())
        path._on_udp(rx)
        assert queued == good
        assert path.dropped["invalid_size"] == 3
    finally:
        rx.close()
        tx.close()
        os.close(r)
        os.close(w)
