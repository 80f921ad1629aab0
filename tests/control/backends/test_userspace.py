"""UserspaceBackend against real daemons in two network namespaces.

Runs with both wireguard-go builds (the UAPI reference; control.netlab.wggo: the
modern one and bookworm's old one) and with our kubespan-wg.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_network as N

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from control import netlab
from control.backends import BackendError, IPNetwork, PeerConfig, WireGuardBackend
from control.backends.uapi_client import UAPIClient
from control.backends.userspace import UserspaceBackend, default_daemon_argv
from control.netlab import wggo
from kubespan_dp.uapisock import socket_path
from tests import netns as nx

DAEMONS = ["kubespan-wg", "wggo-modern", "wggo-old"]
PSK = bytes(range(32))


def keypair() -> tuple[bytes, bytes]:
    k = X25519PrivateKey.generate()
    return (
        k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
    )


@dataclass
class Node:
    ns: netlab.Netns
    backend: UserspaceBackend
    link: str
    private: bytes
    public: bytes
    port: int
    outer: str
    inner: str


def daemon_argv(daemon: str) -> list[str]:
    if daemon == "kubespan-wg":
        return default_daemon_argv()
    return [str(wggo.binary(daemon.removeprefix("wggo-")))]


@pytest.fixture(params=DAEMONS)
def pair(request: pytest.FixtureRequest, lab: nx.Lab) -> tuple[Node, Node]:
    argv = daemon_argv(request.param)
    nss = [lab.netns("ua"), lab.netns("ub")]
    veths = lab.veth(nss[0], nss[1])
    nodes = []
    for i, ns in enumerate(nss):
        netlab.add_address(ns, veths[i], f"{nx.OUTER4[i]}/24")
        netlab.add_address(ns, veths[i], f"{nx.OUTER6[i]}/64")
        link = netlab.unique_name("ks", 8)
        netlab.LEDGER.sockets.add(socket_path(link))
        backend = UserspaceBackend(argv, netns=ns.name, env={"LOG_LEVEL": "verbose"})
        lab.defer(backend.down)
        priv, pub = keypair()
        port = 51820 + i
        backend.up(link, priv, port, 0x20, 1420)
        netlab.LEDGER.pids.add(running_pid(backend))
        netlab.add_address(ns, link, f"{nx.INNER4[i]}/24")
        nodes.append(Node(ns, backend, link, priv, pub, port, nx.OUTER4[i], nx.INNER4[i]))
    return nodes[0], nodes[1]


def running_pid(backend: UserspaceBackend) -> int:
    pid = backend.pid
    assert pid is not None, "the daemon is not running"
    return pid


def same_instant(x: float | None, y: float | None) -> bool:
    """Equal handshake times; our daemon converts monotonic to wall time on every read,
    so allow a few ms of jitter (a new handshake would be None first, then later)."""
    return x is not None and y is not None and abs(x - y) < 0.05


def peer_of(
    node: Node, endpoint: bool = True, extra: Iterable[IPNetwork] = (), keepalive: int = 0
) -> PeerConfig:
    return PeerConfig(
        node.public,
        PSK,
        (node.outer, node.port) if endpoint else None,
        keepalive,
        (N(f"{node.inner}/32"), *extra),
    )


@pytest.mark.netns
def test_protocol_conformance(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    assert isinstance(a.backend, WireGuardBackend)
    assert a.backend.mode == "userspace"


@pytest.mark.netns
def test_handshake_then_diff_keeps_sessions(pair: tuple[Node, Node]) -> None:
    a, b = pair
    t0 = time.time()
    a.backend.apply_peers([peer_of(b)])
    b.backend.apply_peers([peer_of(a, endpoint=False)])  # learns a's endpoint by roaming
    # device settings reached the daemon and the link
    assert "0x20" in a.ns.run("wg", "show", a.link, "fwmark").stdout
    assert a.ns.run("wg", "show", a.link, "listen-port").stdout.strip() == str(a.port)
    assert "mtu 1420" in a.ns.run("ip", "link", "show", a.link).stdout
    assert a.backend.listen_port() == a.port

    nx.ping(a.ns, b.inner)
    sa = a.backend.peer_states()[b.public]
    sb = b.backend.peer_states()[a.public]
    assert sa.endpoint == (b.outer, b.port)
    assert sb.endpoint == (a.outer, a.port)
    assert sa.last_handshake is not None and t0 - 1 <= sa.last_handshake <= time.time() + 1
    assert sa.rx_bytes > 0 and sa.tx_bytes > 0 and sb.rx_bytes > 0 and sb.tx_bytes > 0

    # add a peer: b's session (handshake time and counters) must survive
    c_pub = keypair()[1]
    c = PeerConfig(c_pub, None, None, 0, (N("10.77.9.0/24"),))
    a.backend.apply_peers([peer_of(b), c])
    states = a.backend.peer_states()
    assert set(states) == {b.public, c_pub}
    assert same_instant(states[b.public].last_handshake, sa.last_handshake)
    assert states[b.public].rx_bytes >= sa.rx_bytes and states[b.public].tx_bytes >= sa.tx_bytes
    assert states[c_pub].endpoint is None and states[c_pub].last_handshake is None

    # change b itself (more allowed IPs, keepalive): updated in place, session kept
    a.backend.apply_peers([peer_of(b, extra=(N("10.77.1.0/24"),), keepalive=25), c])
    dump = a.ns.run("wg", "show", a.link, "allowed-ips").stdout
    assert "10.77.1.0/24" in dump and f"{b.inner}/32" in dump and "10.77.9.0/24" in dump
    assert "25" in a.ns.run("wg", "show", a.link, "persistent-keepalive").stdout
    assert same_instant(a.backend.peer_states()[b.public].last_handshake, sa.last_handshake)

    # endpoint None leaves whatever WireGuard has
    a.backend.apply_peers([peer_of(b, endpoint=False, extra=(N("10.77.1.0/24"),), keepalive=25), c])
    assert a.backend.peer_states()[b.public].endpoint == (b.outer, b.port)

    # remove c; b untouched and traffic still flows on the same session
    a.backend.apply_peers([peer_of(b, extra=(N("10.77.1.0/24"),), keepalive=25)])
    before = a.backend.peer_states()
    assert set(before) == {b.public}
    nx.ping(a.ns, b.inner, count=2)
    after = a.backend.peer_states()[b.public]
    assert same_instant(after.last_handshake, sa.last_handshake)
    assert after.tx_bytes > before[b.public].tx_bytes


@pytest.mark.netns
def test_unchanged_apply_sends_nothing(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a.backend.apply_peers([peer_of(b)])
    # drop the peer behind the backend's back: an identical apply must not re-send it
    UAPIClient(socket_path(a.link)).set([("replace_peers", "true")])
    a.backend.apply_peers([peer_of(b)])
    assert a.backend.peer_states() == {}


@pytest.mark.netns
def test_bad_input_changes_nothing(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a.backend.apply_peers([peer_of(b)])
    before = a.ns.run("wg", "showconf", a.link).stdout
    good = peer_of(b)
    bad: list[list[object]] = [
        [PeerConfig(b"short", None, None, 0, ())],
        [good, good],  # duplicate key
        [PeerConfig(keypair()[1], b"x" * 31, None, 0, ())],
        [PeerConfig(keypair()[1], None, ("not-an-ip", 1), 0, ())],
        [PeerConfig(keypair()[1], None, ("192.0.2.1", 70000), 0, ())],
        [PeerConfig(keypair()[1], None, None, -1, ())],
        [PeerConfig(keypair()[1], None, None, 0, ("10.0.0.0/8",))],  # type: ignore[arg-type]  # str
        ["nonsense"],
    ]
    for peers in bad:
        with pytest.raises(ValueError):
            a.backend.apply_peers(peers)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        a.backend.up(a.link, a.private, a.port, 0x20, 100)
    with pytest.raises(ValueError):
        a.backend.up(a.link, b"\0" * 31, a.port, 0x20, 1420)
    with pytest.raises(BackendError):
        a.backend.up("otherlink", a.private, a.port, 0x20, 1420)
    assert a.ns.run("wg", "showconf", a.link).stdout == before


@pytest.mark.netns
def test_second_daemon_on_same_link_refused(pair: tuple[Node, Node], lab: nx.Lab) -> None:
    a, b = pair
    intruder = UserspaceBackend(a.backend.daemon_argv, netns=b.ns.name)
    with pytest.raises(BackendError, match="already serves"):
        intruder.up(a.link, keypair()[0], 0, 0, 1420)
    assert a.backend.peer_states() == {}  # the first one is fine


@pytest.mark.netns
def test_crashed_daemon_is_restarted_with_config(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a.backend.apply_peers([peer_of(b)])
    b.backend.apply_peers([peer_of(a)])
    nx.ping(a.ns, b.inner, count=1)
    old_pid = running_pid(a.backend)
    os.kill(old_pid, signal.SIGKILL)
    netlab.wait_until(lambda: a.backend.pid is None, timeout=10, what="daemon death noticed")
    states = a.backend.peer_states()  # restarts and re-applies everything
    netlab.LEDGER.pids.add(running_pid(a.backend))
    assert a.backend.restarts == 1 and a.backend.pid != old_pid
    assert set(states) == {b.public}
    netlab.add_address(a.ns, a.link, f"{a.inner}/24")  # the new TUN link has no address yet
    assert "0x20" in a.ns.run("wg", "show", a.link, "fwmark").stdout
    nx.ping(a.ns, b.inner, count=1)
    assert a.backend.peer_states()[b.public].last_handshake is not None


@pytest.mark.netns
def test_down_leaves_nothing(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a.backend.apply_peers([peer_of(b)])
    pid = a.backend.pid
    a.backend.down()
    assert a.backend.pid is None
    assert (
        not os.path.exists(f"/proc/{pid}")
        or "Z" in open(f"/proc/{pid}/stat").read().split(")")[-1][:3]
    )
    assert a.ns.run("ip", "link", "show", a.link, check=False).returncode != 0
    assert not socket_path(a.link).exists()
    a.backend.down()  # idempotent
    with pytest.raises(BackendError):
        a.backend.peer_states()


@pytest.mark.netns
def test_uapi_errors_and_no_keys_in_logs(
    pair: tuple[Node, Node], caplog: pytest.LogCaptureFixture
) -> None:
    import base64
    import logging

    from control.backends.uapi_client import UAPIError

    a, b = pair
    caplog.set_level(logging.DEBUG)
    a.backend.apply_peers([peer_of(b)])
    with pytest.raises(UAPIError) as err:
        UAPIClient(socket_path(a.link)).set([("listen_port", "notaport")])
    assert err.value.errno not in (None, 0)
    a.backend.peer_states()
    a.backend.down()
    logged = caplog.text + "".join(a.backend._output)
    for secret in (a.private, PSK):
        assert secret.hex() not in logged
        assert base64.b64encode(secret).decode() not in logged


@pytest.mark.netns
def test_ipv6_outer_endpoint(pair: tuple[Node, Node]) -> None:
    a, b = pair
    v6 = PeerConfig(b.public, PSK, (nx.OUTER6[1], b.port), 0, (N(f"{b.inner}/32"),))
    a.backend.apply_peers([v6])
    b.backend.apply_peers([peer_of(a, endpoint=False)])
    nx.ping(a.ns, b.inner, count=1)
    assert a.backend.peer_states()[b.public].endpoint == (nx.OUTER6[1], b.port)
    assert b.backend.peer_states()[a.public].endpoint == (nx.OUTER6[0], a.port)
