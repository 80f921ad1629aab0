"""The UAPI protocol parser and serializer, without a daemon; how a request's
allowed-IP lines apply, on a device and on wireguard-go."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubespan_dp import uapi
from kubespan_dp.device import Device
from kubespan_dp.fastloop import FastDataPath
from kubespan_dp.peer import Peer
from kubespan_dp.uapi import UNSET, UapiError, parse_set
from tests import netns
from tests.kubespan_dp.wgpair import ipv4_packet

K1 = "11" * 32
K2 = "22" * 32


def test_full_request() -> None:
    req = parse_set(
        [
            f"private_key={K1}",
            "listen_port=51820",
            "fwmark=32",
            "replace_peers=true",
            f"public_key={K2}",
            f"preshared_key={K1}",
            "endpoint=[fd00::1]:51820",
            "persistent_keepalive_interval=25",
            "replace_allowed_ips=true",
            "allowed_ip=10.0.0.1/32",
            "allowed_ip=fd00::/64",
            "protocol_version=1",
            f"public_key={K1}",
            "remove=true",
            f"public_key={K1}",
            "update_only=true",
            "endpoint=1.2.3.4:5",
        ]
    )
    assert req.private_key == bytes.fromhex(K1)
    assert (req.listen_port, req.fwmark, req.replace_peers) == (51820, 32, True)
    p, r, u = req.peers
    assert p.public_key == bytes.fromhex(K2) and p.preshared_key == bytes.fromhex(K1)
    assert p.endpoint == ("fd00::1", 51820) and p.persistent_keepalive == 25
    assert p.replace_allowed_ips
    assert p.allowed_ips == [ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("fd00::/64")]
    assert r.remove and not r.update_only
    assert u.update_only and u.endpoint == ("1.2.3.4", 5)


def test_zero_keys_mean_none_and_a_late_replace_stays_in_line_order() -> None:
    req = parse_set(
        [
            f"private_key={'0' * 64}",
            f"public_key={K2}",
            f"preshared_key={'0' * 64}",
            "allowed_ip=10.0.0.0/8",
            "replace_allowed_ips=true",
            "allowed_ip=10.1.0.0/16",
        ]
    )
    assert req.private_key is None
    assert req.peers[0].preshared_key is None
    # kept in order: what the earlier line took from another peer stays taken
    assert req.peers[0].allowed_ip_changes == [
        (ipaddress.ip_network("10.0.0.0/8"), True),
        (None, False),
        (ipaddress.ip_network("10.1.0.0/16"), True),
    ]


def test_host_bits_are_masked() -> None:
    req = parse_set([f"public_key={K2}", "allowed_ip=10.1.2.3/16"])
    assert req.peers[0].allowed_ips == [ipaddress.ip_network("10.1.0.0/16")]


def test_unset_fields_stay_unset() -> None:
    req = parse_set([f"public_key={K2}"])
    assert req.private_key is UNSET and req.listen_port is UNSET and req.fwmark is UNSET
    assert req.peers[0].endpoint is UNSET and req.peers[0].preshared_key is UNSET


BAD = [
    (["listen_port=65536"], -22),
    (["listen_port=-1"], -22),
    (["listen_port= 1"], -22),
    (["listen_port=+1"], -22),
    (["listen_port=1_0"], -22),
    (["fwmark=4294967296"], -22),
    (["fwmark=0x20"], -22),
    (["private_key=abc"], -22),
    ([f"private_key={'g' * 64}"], -22),
    (["replace_peers=false"], -22),
    (["bogus=1"], -22),
    (["no equals sign"], -71),
    ([f"public_key={K2}", "listen_port=1"], -22),  # device key inside a peer section
    ([f"public_key={K2}", "endpoint=1.2.3.4"], -22),
    ([f"public_key={K2}", "endpoint=host:1"], -22),
    ([f"public_key={K2}", "endpoint=[::1]"], -22),
    ([f"public_key={K2}", "endpoint=::1:5"], -22),
    ([f"public_key={K2}", "endpoint=1.2.3.4:99999"], -22),
    ([f"public_key={K2}", "endpoint=1.2.3.4:0"], -22),
    ([f"public_key={K2}", "allowed_ip=10.0.0.0/33"], -22),
    ([f"public_key={K2}", "allowed_ip=10.0.0.0"], -22),
    ([f"public_key={K2}", "allowed_ip=fe80::%eth0/64"], -22),
    ([f"public_key={K2}", "persistent_keepalive_interval=65536"], -22),
    ([f"public_key={K2}", "protocol_version=2"], -22),
    ([f"public_key={K2}", "remove=1"], -22),
    ([f"public_key={K2}", "update_only=yes"], -22),
    ([f"public_key={K2}", "replace_allowed_ips=x"], -22),
    ([f"public_key={K2[:-1]}"], -22),
]


@pytest.mark.parametrize("lines,code", BAD)
def test_bad_requests(lines: list[str], code: int) -> None:
    with pytest.raises(UapiError) as err:
        parse_set(lines)
    assert err.value.errno == code


@given(st.lists(st.text(max_size=80), max_size=8))
def test_arbitrary_lines_parse_or_raise_uapi_error(lines: list[str]) -> None:
    try:
        parse_set(lines)
    except UapiError as e:
        assert e.errno in (-22, -71)


def test_format_get() -> None:
    dev = uapi.DeviceInfo(
        bytes.fromhex(K1),
        51820,
        0,
        [
            uapi.PeerInfo(
                bytes.fromhex(K2),
                None,
                ("fd00::1", 7),
                1_700_000_000_123_456_789,
                10,
                20,
                25,
                [ipaddress.ip_network("10.0.0.0/8")],
            )
        ],
    )
    assert uapi.format_get(dev).splitlines() == [
        f"private_key={K1}",
        "listen_port=51820",
        f"public_key={K2}",
        f"preshared_key={'0' * 64}",
        "protocol_version=1",
        "endpoint=[fd00::1]:7",
        "last_handshake_time_sec=1700000000",
        "last_handshake_time_nsec=123456789",
        "tx_bytes=10",
        "rx_bytes=20",
        "persistent_keepalive_interval=25",
        "allowed_ip=10.0.0.0/8",
    ]


# ------------------------------------------------------------------ allowed IPs in order

K3 = "33" * 32
A, B = "10.0.0.0/8", "10.1.0.0/16"

# (lines of one set request after K3 owns A and K2 exists, what each peer then has),
# the results wireguard-go gives (device/uapi.go applies each line as it comes:
# an addition takes the prefix from its owner, a removal only drops it if this
# peer has it, replace_allowed_ips drops this peer's at that point)
ORDER_CASES = [
    ([f"public_key={K2}", f"allowed_ip={A}", f"allowed_ip=-{A}"], {K2: set(), K3: set()}),
    ([f"public_key={K2}", f"allowed_ip=-{A}", f"allowed_ip={A}"], {K2: {A}, K3: set()}),
    ([f"public_key={K3}", f"allowed_ip=-{A}", f"allowed_ip={A}"], {K2: set(), K3: {A}}),
    ([f"public_key={K3}", f"allowed_ip={A}", f"allowed_ip=-{A}"], {K2: set(), K3: set()}),
    (
        [f"public_key={K2}", f"allowed_ip={A}", "replace_allowed_ips=true", f"allowed_ip={B}"],
        {K2: {B}, K3: set()},
    ),
    (
        [f"public_key={K2}", f"allowed_ip={A}", f"public_key={K3}", f"allowed_ip=-{A}"],
        {K2: {A}, K3: set()},
    ),
    (
        [f"public_key={K2}", f"allowed_ip={A}", f"public_key={K3}", f"allowed_ip={A}"],
        {K2: set(), K3: {A}},
    ),
]
SETUP = [f"public_key={K3}", f"allowed_ip={A}", f"public_key={K2}"]


class _Tun:
    def __init__(self, fd: int) -> None:
        self.name, self.fd = f"kso{os.getpid() % 10000}", fd

    def exists(self) -> bool:
        return True

    def close(self) -> None:
        pass


@pytest.fixture(params=["python", "c"])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Device]:
    """A device on a pipe instead of a TUN device: UAPI sets only."""
    monkeypatch.setenv("KUBESPAN_WG_FASTPATH", "1" if request.param == "c" else "0")
    r, w = os.pipe()
    uapi_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    d = Device(_Tun(w), uapi_sock, None)  # type: ignore[arg-type]
    yield d
    for s in (d.sock4, d.sock6):
        if s is not None:
            s.close()
    uapi_sock.close()
    os.close(r)
    os.close(w)


def _owners(get_reply: str) -> dict[str, set[str]]:
    """Each peer's allowed IPs (hex public key -> prefixes) from a get=1 reply."""
    out: dict[str, set[str]] = {}
    key = None
    for line in get_reply.splitlines():
        k, _, v = line.partition("=")
        if k == "public_key":
            key = v
            out[key] = set()
        elif k == "allowed_ip" and key is not None:
            out[key].add(v)
    return out


@pytest.mark.parametrize("lines,want", ORDER_CASES)
def test_allowed_ip_lines_apply_in_order(
    device: Device, lines: list[str], want: dict[str, set[str]]
) -> None:
    device.uapi_set(parse_set(SETUP))
    device.uapi_set(parse_set(lines))
    assert _owners(device.uapi_get()) == want
    # and packets to A go where the core says (in C too: the route reached it now)
    owner = device.core.allowed_ips.lookup(bytes([10, 2, 3, 4]))
    holder = {k for k, nets in want.items() if A in nets}
    assert holder == ({owner.public_key.hex()} if isinstance(owner, Peer) else set())
    if isinstance(device.path, FastDataPath):
        pid = device.path.c.route(ipv4_packet("192.168.0.1", "10.2.3.4"))
        assert pid == (device.path._ids[bytes.fromhex(holder.pop())] if holder else -1)


@pytest.mark.netns
@pytest.mark.parametrize("kind", ["kubespan-wg", "wireguard-go"])
def test_allowed_ip_order_as_wireguard_go(lab: netns.Lab, kind: str) -> None:
    """The same requests to wireguard-go itself and to our daemon: the same result.
    The wireguard-go installed here (0.0.2023…) predates `allowed_ip=-PREFIX`
    (wireguard-go 256bcbd, 2025): it gets only the cases without removals."""
    ns = lab.netns("kuo")
    cases = [
        (lines, want)
        for lines, want in ORDER_CASES
        if kind != "wireguard-go" or not any(x.startswith("allowed_ip=-") for x in lines)
    ]
    assert len(cases) >= 2
    for lines, want in cases:
        d = lab.daemon(ns, kind)
        for body in (SETUP, lines):
            reply = netns.uapi_request(d.ifname, "set=1\n" + "".join(x + "\n" for x in body) + "\n")
            assert reply == "errno=0\n\n", (kind, body, reply)
        assert _owners(netns.uapi_request(d.ifname, "get=1\n\n")) == want, (kind, lines)
        d.stop()
