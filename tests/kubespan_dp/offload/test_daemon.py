"""Our daemon with TUN offloads (the default with the C loop) and with them forced
off (KUBESPAN_WG_TUN_OFFLOAD=0), against itself and both wireguard-go builds: 200 MB
each way over TCP, on IPv4 and IPv6 inner addresses, arrive with the sha256 they
left with.  Whether the kernel sees TSO on our TUN is asked through ethtool's ioctl."""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct

import pytest

from control.netlab import Netns
from tests import netns
from tests.netns import INNER4, INNER6

pytestmark = pytest.mark.netns

OURS = "kubespan-wg"
TRANSFER = 200 * 1000 * 1000
OFF = {"KUBESPAN_WG_TUN_OFFLOAD": "0"}
ON: dict[str, str] = {}
SIOCETHTOOL = 0x8946
ETHTOOL_GTSO = 0x1E  # struct ethtool_value: TCP segmentation offload on or off


@pytest.fixture(autouse=True)
def fastpath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBESPAN_WG_FASTPATH", "1")
    monkeypatch.delenv("KUBESPAN_WG_TUN_OFFLOAD", raising=False)


def tso_on(ns: Netns, ifname: str) -> bool:
    """The kernel's view: does the interface take TSO super-packets (ethtool -k)?"""
    value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_GTSO, 0), 8)
    ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
    return struct.unpack("II", value.raw)[1] != 0


def both_ways(a: netns.WgHost, b: netns.WgHost, inner: str, nbytes: int, mss: int = 0) -> None:
    family = INNER4 if inner == "4" else INNER6
    for server, client, ip in ((b, a, family[1]), (a, b, family[0])):
        sent, got, _ = netns.tcp_transfer(server.ns, client.ns, ip, nbytes, mss=mss)
        assert sent == got, f"{client.daemon.kind} -> {server.daemon.kind} over {ip}"
    assert a.daemon.alive() and b.daemon.alive()


def env_for(kind: str, env: dict[str, str]) -> dict[str, str] | None:
    return env if kind == OURS else None


WGGO = list(netns.WGGO_KINDS)
PAIRS = [(OURS, OURS)] + [(OURS, k) for k in WGGO]
IDS = ["ours-ours"] + [f"ours-{netns.WGGO_IDS[k]}" for k in WGGO]


@pytest.mark.parametrize("inner", ["4", "6"])
@pytest.mark.parametrize("kinds", PAIRS, ids=IDS)
def test_offloads_on_200mb_each_way(lab: netns.Lab, kinds: tuple[str, str], inner: str) -> None:
    a, b = netns.build_pair(lab, *kinds)
    assert tso_on(a.ns, a.ifname)
    if kinds[1] == OURS:
        assert tso_on(b.ns, b.ifname)
    both_ways(a, b, inner, TRANSFER)


@pytest.mark.parametrize("inner", ["4", "6"])
@pytest.mark.parametrize("kinds", PAIRS[:2], ids=IDS[:2])
def test_offloads_forced_off_200mb_each_way(
    lab: netns.Lab, kinds: tuple[str, str], inner: str
) -> None:
    a, b = netns.build_pair(lab, *kinds, envs=(OFF, env_for(kinds[1], OFF)))
    assert not tso_on(a.ns, a.ifname)
    if kinds[1] == OURS:
        assert not tso_on(b.ns, b.ifname)
    both_ways(a, b, inner, TRANSFER)


def test_offloads_on_one_side_only(lab: netns.Lab) -> None:
    a, b = netns.build_pair(lab, OURS, OURS, envs=(ON, OFF))
    assert tso_on(a.ns, a.ifname) and not tso_on(b.ns, b.ifname)
    both_ways(a, b, "4", TRANSFER // 4)
    both_ways(a, b, "6", TRANSFER // 4)


@pytest.mark.parametrize("inner", ["4", "6"])
def test_super_packets_of_more_segments_than_slots(lab: netns.Lab, inner: str) -> None:
    # MSS 200: a 64 KiB TSO super-packet is ~330 segments, more than the 128 slots
    # of one batch; it continues in the next ones, in order
    a, b = netns.build_pair(lab, OURS, OURS)
    both_ways(a, b, inner, 20 * 1000 * 1000, mss=200)


def test_first_packet_through_the_core_arrives(lab: netns.Lab) -> None:
    # the first ping waits in the initiator's core for the handshake, and the
    # responder's core opens it (its session is not C's yet): Python writes it to a
    # TUN that expects a virtio header in front of every packet
    a, b = netns.build_pair(lab, OURS, OURS)
    assert tso_on(b.ns, b.ifname)
    r = a.ns.run("ping", "-c", "1", "-W", "10", INNER4[1], check=False)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("how", ["flag", "env", "pure-python"])
def test_plain_tun_when_asked(lab: netns.Lab, how: str) -> None:
    """--no-offload, KUBESPAN_WG_TUN_OFFLOAD=0 and the pure-Python path (which reads
    the TUN itself) open a plain TUN; the default opens it with offloads."""
    ns = lab.netns("kopl")
    env = {"KUBESPAN_WG_TUN_OFFLOAD": "0"} if how == "env" else {}
    if how == "pure-python":
        env["KUBESPAN_WG_FASTPATH"] = "0"
    plain = lab.daemon(ns, OURS, env=env, args=("--no-offload",) if how == "flag" else ())
    default = lab.daemon(ns, OURS)
    assert not tso_on(ns, plain.ifname)
    assert tso_on(ns, default.ifname)
