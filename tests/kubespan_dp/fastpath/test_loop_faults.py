"""The C loop's failure paths: what it does when a counter runs out, a send fails,
two threads drop at once, a datagram does not fit, an allocation fails under its
lock.  Real sockets and TUN devices in namespaces where the kernel can produce the
condition; where it cannot (no UDP datagram is longer than the loop's 64 KiB
buffers, calloc does not fail on demand) a child process runs the loop with
faults.c preloaded."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from control import netlab
from kubespan_dp import _batch as bt
from kubespan_dp import _fastpath as fp
from kubespan_dp.timers import REJECT_AFTER_MESSAGES
from tests import netns
from tests.kubespan_dp.fastpath.test_loop import INNER, OUTER, PORT, Side, _wait

HERE = Path(__file__).resolve().parent
SO_RCVBUFFORCE = 33


def _lab_pair(lab: netns.Lab, prefix: str) -> tuple[netlab.Netns, netlab.Netns]:
    a, b = lab.netns(prefix + "a"), lab.netns(prefix + "b")
    va, vb = lab.veth(a, b)
    netns.add_address(a, va, f"{OUTER[0]}/24")
    netns.add_address(b, vb, f"{OUTER[1]}/24")
    return a, b


def _udp(ns: netlab.Netns, bind: tuple[str, int] | None = None) -> socket.socket:
    with ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if bind is not None:
        s.bind(bind)
    return s


def _queue_on_tun(side: Side, dest: str, n: int, size: int = 100) -> None:
    """`n` IP packets of one size into the side's TUN device (to `dest`, an inner
    address), sent while its loop is stopped: they wait there for one burst."""
    side.ns.run("ip", "link", "set", side.tun.name, "txqueuelen", str(max(1000, 2 * n)))
    s = _udp(side.ns)
    try:
        for _ in range(n):
            s.sendto(bytes(size), (dest, 9))
    finally:
        s.close()


# ------------------------------------------------------------------ netns: real kernel


@pytest.mark.netns
def test_exhausted_counter_never_sends(lab: netns.Lab) -> None:
    """A keypair three counters short of REJECT_AFTER_MESSAGES and a burst of ten
    packets: three leave sealed with the last valid counters, every other packet
    goes to the core (which starts a handshake), none leaves with a counter at or
    past the limit, none unsealed."""
    a_ns, b_ns = _lab_pair(lab, "kxe")
    a = Side(lab, a_ns, 0)
    catcher = _udp(b_ns, (OUTER[1], PORT))  # plays the peer: sees what goes out
    lab.defer(catcher.close)
    catcher.settimeout(5)
    k1, k2 = os.urandom(32), os.urandom(32)
    kp = fp.Keypair(
        k1, k2, 0x1111, 0x2222, created=time.monotonic(), send_counter=REJECT_AFTER_MESSAGES - 3
    )
    a.loop.stop()
    a.loop.set_keypairs(0, kp, None)
    _queue_on_tun(a, INNER[1], 10)
    a.loop.start()
    slow: list[tuple[int, bytes, object, int, object]] = []

    def done() -> bool:
        slow.extend(a.loop.take_slow())
        return len(slow) >= 7 and a.loop.tx_packets >= 3

    _wait(done)
    assert a.loop.tx_packets == 3 and len(slow) == 7
    assert all(item[0] == fp.SLOW_PACKET for item in slow)
    counters = []
    for _ in range(3):
        data = catcher.recv(65536)
        _, receiver, counter = struct.unpack_from("<IIQ", data)
        bt.AEADKey(k1).open(counter, data[16:])  # sealed, with the keypair's key
        counters.append(counter)
    # (the first packet went to the core too: past REKEY_AFTER_MESSAGES it must rekey)
    assert sorted(counters) == [REJECT_AFTER_MESSAGES - 3 + i for i in range(3)]
    assert kp.send_counter == REJECT_AFTER_MESSAGES
    catcher.setblocking(False)
    with pytest.raises(BlockingIOError):
        catcher.recv(65536)
    assert "seal_failed" not in a.loop.drops()


@pytest.mark.netns
def test_drop_counters_exact_when_both_threads_drop(lab: netns.Lab) -> None:
    """Both threads push to the slow queue at once and, once it is full, both count
    `slow_queue_full`: the sending thread for packets to a peer without a session,
    the receiving thread for data on an index Python pushed.  Every one is counted
    (with a plain `+=` instead of the atomic add, counts go missing in most runs)."""
    n = 20000
    a_ns, b_ns = _lab_pair(lab, "kxd")
    b = Side(lab, b_ns, 1)
    b.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    b.loop.set_pending([0x5555])
    b.loop.stop()
    # queued for the receiving thread: data on the pending index, from A
    s = _udp(a_ns, (OUTER[0], PORT))
    try:
        msg = struct.pack("<IIQ", 4, 0x5555, 0) + bytes(32)
        for _ in range(n):
            s.sendto(msg, (OUTER[1], PORT))
    finally:
        s.close()
    # queued for the sending thread: packets to A's inner address (no keypair)
    _queue_on_tun(b, INNER[0], n)
    b.loop.start()  # both threads find a full burst waiting
    slow_cap = 512  # what the slow queue holds; Python takes nothing meanwhile
    want = 2 * n - slow_cap
    try:
        _wait(lambda: b.loop.drops().get("slow_queue_full", 0) >= want, timeout=15)
    except AssertionError:
        pass  # a count lost to a race never arrives: the message below shows it
    drops = b.loop.drops()
    stats = b.ns.run("ip", "-s", "link", "show", b.tun.name).stdout
    assert drops.get("slow_queue_full") == want, (drops, stats)
    assert len(b.loop.take_slow(slow_cap)) == slow_cap


@pytest.mark.netns
def test_failed_gso_send_counts_every_datagram(lab: netns.Lab) -> None:
    """A burst to a peer whose endpoint the kernel cannot reach: the loop sends
    runs of same-size datagrams as one UDP GSO message, the kernel refuses it, and
    every datagram in it is counted as `udp_send_failed`, not one per message."""
    n = 200
    a_ns, _ = _lab_pair(lab, "kxg")
    a = Side(lab, a_ns, 0)
    a.loop.set_endpoint(0, ("192.0.2.1", PORT))  # no route to it in A
    kp = fp.Keypair(os.urandom(32), os.urandom(32), 0x1111, 0x2222, created=time.monotonic())
    a.loop.set_keypairs(0, kp, None)
    for burst in (1, 2):  # (an unreachable peer says nothing about GSO: still on)
        a.loop.stop()
        _queue_on_tun(a, INNER[1], n)
        a.loop.start()
        _wait(lambda: a.loop.tx_packets >= burst * n)  # noqa: B023
        _wait(lambda: a.loop.drops().get("udp_send_failed", 0) >= burst * n)  # noqa: B023
        assert a.loop.drops().get("udp_send_failed") == burst * n == a.loop.tx_packets
        assert a.loop.udp_gso  # one unreachable peer must not cost every peer GSO


# ------------------------------------------------------------------ a child with faults.c


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    so = tmp_path_factory.mktemp("faults") / "faults.so"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-Wall", "-o", str(so), str(HERE / "faults.c")]
        + ["-ldl", "-lcrypto"],
        check=True,
        env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},  # (ASan runs)
    )
    return so


def _child(faults: Path, scenario: str, **env: str) -> dict[str, object]:
    preload = " ".join(p for p in (os.environ.get("LD_PRELOAD"), str(faults)) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kubespan_dp.fastpath.loop_child", scenario],
        cwd=HERE.parents[2],
        env={**os.environ, "LD_PRELOAD": preload, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_seal_failure_never_sends(faults: Path) -> None:
    """OpenSSL fails to seal three packets of a burst: each is counted as
    `seal_failed` and never leaves (it would be half-encrypted, without its tag);
    the two that sealed go out and open."""
    got = _child(faults, "seal")
    assert got == {"drops": {"seal_failed": 3}, "opened": ["seal3", "seal4"], "more": False}


def test_truncated_datagram_counted_not_processed(faults: Path) -> None:
    """A datagram longer than the receive buffer (MSG_TRUNC) is counted and dropped:
    neither a cut-down transport message nor a longer initiation cut to exactly an
    initiation's size is processed; the datagrams that fit are."""
    got = _child(faults, "truncated", KS_TEST_RECV_BUFFER="148")
    assert got["drops"] == {"udp_truncated": 2}
    assert got["delivered"] == [got["expected"]]
    assert got["handshakes"] == [148]


def test_remove_peer_releases_its_lock_when_it_fails(faults: Path) -> None:
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("AddressSanitizer's calloc comes first: faults.c cannot fail one")
    got = _child(faults, "lock")
    assert got == {
        "remove_peer": "MemoryError",
        "add_peer_returned": True,
        "delivered": True,
        "sent": True,
        "removed_later": True,
    }
