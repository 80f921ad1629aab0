"""Both WireGuard backends accept, refuse and normalise peers by the same rule.

The rule is control.backends.base (validate_device, validate_peers, diff_peers). The
kernel backend cannot run here (no WireGuard module: tests/vm runs it for real), but
its validation happens before any netlink call, so it is exercised with netlink
forbidden. The userspace backend runs for real, against our daemon in a namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from ipaddress import ip_network as N

import pytest

from control.backends import kernel as kernel_mod
from control.backends.base import (
    ZERO_KEY,
    BackendConfigError,
    PeerConfig,
    PeerUpdate,
    diff_peers,
    validate_device,
    validate_peers,
)
from control.backends.kernel import KernelBackend
from control.backends.userspace import UserspaceBackend, default_daemon_argv, diff_items
from control.keys import generate_private_key, public_key
from kubespan_dp.uapisock import socket_path
from tests import netns as nx
from tests.control.backends.cases import BAD_DEVICES, BAD_PEERS, K1, K2, PSK, peer
from tests.control.backends.test_userspace import running_pid


def refusal(call: Callable[[], object]) -> str:
    with pytest.raises(BackendConfigError) as info:
        call()
    assert isinstance(info.value, ValueError)  # callers may catch either
    return str(info.value)


# ------------------------------------------------------------------ the shared rule


@pytest.mark.parametrize("name", sorted(BAD_PEERS))
def test_shared_peer_validation(name: str) -> None:
    peers, message = BAD_PEERS[name]
    assert refusal(lambda: validate_peers(peers())) == message


@pytest.mark.parametrize("name", sorted(BAD_DEVICES))
def test_shared_device_validation(name: str) -> None:
    args, message = BAD_DEVICES[name]
    assert refusal(lambda: validate_device(*args)) == message


def test_messages_never_hold_keys() -> None:
    secret = bytes(range(100, 131))  # 31 bytes: refused, and must not be echoed
    message = refusal(lambda: validate_peers([peer(psk=secret)]))
    assert secret.hex() not in message and repr(secret) not in message


def test_normalisation() -> None:
    got = validate_peers(
        [
            peer(K1, psk=ZERO_KEY, ep=("::ffff:192.0.2.1", 5), ips=(N("10.1.0.0/16"),) * 2),
            peer(K2, psk=bytearray(PSK), ep=("2001:DB8::1", 5)),
        ]
    )
    assert list(got) == [K1, K2]
    assert got[K1].preshared_key is None  # all-zero means "no preshared key"
    assert got[K1].endpoint == ("192.0.2.1", 5)
    assert got[K1].allowed_ips == (N("10.1.0.0/16"),)
    assert got[K2].preshared_key == PSK and type(got[K2].preshared_key) is bytes
    assert got[K2].endpoint == ("2001:db8::1", 5)
    # nested prefixes on two peers are fine: WireGuard routes by longest prefix
    validate_peers([peer(K1, ips=(N("10.0.0.0/8"),)), peer(K2, ips=(N("10.1.0.0/16"),))])


def test_diff() -> None:
    have = validate_peers([peer(K1), peer(K2)])
    assert not diff_peers(have, have)
    assert diff_peers(have, {}).removed == (K1, K2)
    # an endpoint of None leaves WireGuard's; an equal address in other spelling is no change
    same = validate_peers([peer(K1, ep=None), peer(K2)])
    assert not diff_peers(have, same)
    spelled = {K1: PeerConfig(K1, PSK, ("192.0.2.1", 51820), 25, have[K1].allowed_ips)}
    assert not diff_peers(
        {K1: PeerConfig(K1, PSK, ("::ffff:192.0.2.1", 51820), 25, spelled[K1].allowed_ips)}, spelled
    )
    new = validate_peers(
        [peer(K1, ka=5, ep=("192.0.2.9", 1)), peer(K2, psk=ZERO_KEY, ips=(N("10.5.0.0/16"),))]
    )
    diff = diff_peers(have, new)
    assert diff.removed == () and diff.unchanged == 0
    assert diff.updates == (
        PeerUpdate(new[K1], False, frozenset({"persistent_keepalive", "endpoint"})),
        PeerUpdate(new[K2], False, frozenset({"preshared_key", "allowed_ips"})),
    )
    created = diff_peers({}, validate_peers([peer(K1, ep=None)]))
    assert created.updates[0].new
    assert created.updates[0].fields == {"preshared_key", "persistent_keepalive", "allowed_ips"}


def test_both_backends_write_the_same_diff() -> None:
    """The kernel request and the UAPI items carry the same fields for one update."""
    have = validate_peers([peer(K1)])
    want = validate_peers([peer(K1, ep=("192.0.2.9", 1)), peer(K2, ep=None)])
    changed, created = diff_peers(have, want).updates
    req = kernel_mod._peer_request(changed)
    assert (req["endpoint_addr"], req["endpoint_port"]) == ("192.0.2.9", 1)
    assert "endpoint_addr" not in kernel_mod._peer_request(created)  # None: not written
    items = diff_items(have, want)
    assert ("endpoint", "192.0.2.9:1") in items
    assert [k for k, _ in items].count("endpoint") == 1


# ------------------------------------------------------------------ the kernel backend


@pytest.fixture
def kernel_backend(monkeypatch: pytest.MonkeyPatch) -> KernelBackend:
    """A KernelBackend that believes its link is up and may not touch netlink."""

    def forbidden(*_args: object) -> None:
        raise AssertionError("netlink touched before the input was validated")

    backend = KernelBackend()
    backend.link = "kswgtest"
    monkeypatch.setattr(backend, "_ipr", forbidden)
    monkeypatch.setattr(backend, "_wg", forbidden)
    return backend


@pytest.mark.parametrize("name", sorted(BAD_PEERS))
def test_kernel_backend_refuses_peers(kernel_backend: KernelBackend, name: str) -> None:
    peers, message = BAD_PEERS[name]
    assert refusal(lambda: kernel_backend.apply_peers(peers())) == message


@pytest.mark.parametrize("name", sorted(BAD_DEVICES))
def test_kernel_backend_refuses_devices(kernel_backend: KernelBackend, name: str) -> None:
    args, message = BAD_DEVICES[name]
    assert refusal(lambda: kernel_backend.up(*args)) == message


# ------------------------------------------------------------------ the userspace backend


@pytest.fixture
def userspace(lab: nx.Lab) -> tuple[UserspaceBackend, nx.Netns, str]:
    ns = lab.netns("up")
    link = nx.unique_name("ks", 8)
    nx.LEDGER.sockets.add(socket_path(link))
    backend = UserspaceBackend(default_daemon_argv(), netns=ns.name)
    lab.defer(backend.down)
    backend.up(link, generate_private_key(), 0, 0x20, 1420)
    nx.LEDGER.pids.add(running_pid(backend))
    return backend, ns, link


@pytest.mark.netns
def test_userspace_backend_refuses_the_same(userspace) -> None:
    backend, ns, link = userspace
    good = PeerConfig(public_key(generate_private_key()), PSK, None, 0, (N("10.9.0.0/16"),))
    backend.apply_peers([good])
    before = ns.run("wg", "showconf", link).stdout
    for name, (peers, message) in BAD_PEERS.items():
        assert refusal(partial(backend.apply_peers, peers())) == message, name
    for name, (args, message) in BAD_DEVICES.items():
        assert refusal(partial(backend.up, *args)) == message, name
    assert ns.run("wg", "showconf", link).stdout == before  # nothing reached the daemon


@pytest.mark.netns
def test_userspace_backend_takes_a_zero_psk_as_none(userspace) -> None:
    backend, ns, link = userspace
    key = public_key(generate_private_key())
    backend.apply_peers([PeerConfig(key, ZERO_KEY, None, 0, (N("10.9.0.0/16"),))])
    assert "PresharedKey" not in ns.run("wg", "showconf", link).stdout
    # Drop the peer behind the backend's back: if None were a change from the zero key,
    # the next apply would write the peer again.
    ns.run("wg", "set", link, "peer", _b64(key), "remove")
    backend.apply_peers([PeerConfig(key, None, None, 0, (N("10.9.0.0/16"),))])
    assert backend.peer_states() == {}


def _b64(key: bytes) -> str:
    import base64

    return base64.b64encode(key).decode()
