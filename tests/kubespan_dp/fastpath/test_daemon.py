"""Our daemon with the C packet loop (KUBESPAN_WG_FASTPATH=1) against itself and
against both wireguard-go builds (modern and old, control.netlab.wggo): the session
is negotiated by the Python core, the data moves through C, and everything the core
reports (counters, endpoint) stays right."""

from __future__ import annotations

import time

import pytest

from control import netlab
from tests import netns
from tests.netns import INNER4, INNER6

pytestmark = pytest.mark.netns

WGGO = list(netns.WGGO_KINDS)
PAIRS = (
    [("kubespan-wg", "kubespan-wg")]
    + [("kubespan-wg", k) for k in WGGO]
    + [(k, "kubespan-wg") for k in WGGO]
)
IDS = (
    ["ours-ours"]
    + [f"ours-{netns.WGGO_IDS[k]}" for k in WGGO]
    + [f"{netns.WGGO_IDS[k]}-ours" for k in WGGO]
)


@pytest.fixture(autouse=True)
def fastpath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBESPAN_WG_FASTPATH", "1")


def _row(host: netns.WgHost, key: str) -> list[str]:
    return next(r for r in host.dump()[1:] if r[0] == key)


@pytest.mark.parametrize("kinds", PAIRS, ids=IDS)
def test_transfer_both_ways_with_counters(lab: netns.Lab, kinds: tuple[str, str]) -> None:
    a, b = netns.build_pair(lab, *kinds)
    netns.ping(a.ns, INNER4[1])
    netns.ping(b.ns, INNER6[0])
    for server, client, ip in ((b, a, INNER4[1]), (a, b, INNER6[0])):
        sent, got, _ = netns.tcp_transfer(server.ns, client.ns, ip, 30 << 20)
        assert sent == got

    # Under a bulk flood the receiving socket may overflow (UDP drops, TCP repairs),
    # so counters are compared exactly only for quiet traffic: deltas over pings.
    def counters() -> tuple[int, int, int, int]:
        ra, rb = _row(a, b.public_key), _row(b, a.public_key)
        return int(ra[5]), int(ra[6]), int(rb[5]), int(rb[6])  # a rx, a tx, b rx, b tx

    netlab.wait_until(
        lambda: (c := counters())[1] >= c[2] > 30 << 20 and c[3] >= c[0] > 30 << 20,
        timeout=15,
        what="counters to cover the transfers",
    )
    before = counters()
    while True:  # let the tail of the bulk transfer land first
        time.sleep(0.5)
        now = counters()
        if now == before:
            break
        before = now
    a.ns.run("ping", "-c", "5", "-i", "0.2", INNER4[1])

    def balanced() -> bool:
        d = [x - y for x, y in zip(counters(), before, strict=True)]
        return d[1] > 0 and d[1] == d[2] and d[3] == d[0]

    netlab.wait_until(balanced, timeout=15, what="ping tx/rx deltas to match across the pair")
    assert _row(a, b.public_key)[4] != "0"  # latest handshake
    for host in (a, b):
        if host.daemon.kind == "kubespan-wg":
            host.daemon.stop()
            assert "C fast path" in host.daemon.output()


def test_roaming_port_change_through_c_loop(lab: netns.Lab) -> None:
    a, b = netns.build_pair(lab, "kubespan-wg", "kubespan-wg")
    netns.ping(a.ns, INNER4[1])
    a.wg("set", a.ifname, "listen-port", "51999")  # A's source port changes
    netns.ping(a.ns, INNER4[1])
    assert _row(b, a.public_key)[2].endswith(":51999")


@pytest.mark.parametrize(
    "kinds",
    PAIRS[:3],
    ids=IDS[:3],
)
def test_core_keepalives_resealed_on_c_keypairs(lab: netns.Lab, kinds: tuple[str, str]) -> None:
    """Persistent keepalives come from the core's timers but the keypair's counter
    lives in C: they must be resealed with C's counters (else the peer's replay
    window or our own nonce discipline would break) and keep the session alive."""
    a, b = netns.build_pair(lab, *kinds, keepalive=1)
    netns.ping(a.ns, INNER4[1])  # session up, keypair handed to C
    sent, got, _ = netns.tcp_transfer(b.ns, a.ns, INNER4[1], 2 << 20)  # C counters move
    assert sent == got

    def rx() -> int:
        return int(_row(b, a.public_key)[5])  # b's rx from a

    before = rx()
    while True:  # the transfer's tail lands first
        time.sleep(0.3)
        if rx() == before:
            break
        before = rx()
    time.sleep(3.5)  # idle: only a's keepalives flow
    grown = rx() - before
    assert grown >= 2 * 32 and grown % 32 == 0, grown
    netns.ping(a.ns, INNER4[1])
    netns.ping(b.ns, INNER4[0])
    stats = netns.uapi_request(a.ifname, "stats=1\n\n")
    assert "replay" not in stats and "decrypt_failed" not in stats, stats
    if kinds[1] == "kubespan-wg":
        stats = netns.uapi_request(b.ifname, "stats=1\n\n")
        assert "replay" not in stats and "decrypt_failed" not in stats, stats


def test_pure_python_path_still_selectable(lab: netns.Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """KUBESPAN_WG_FASTPATH=0 keeps the pure-Python packet path (the reference)."""
    monkeypatch.setenv("KUBESPAN_WG_FASTPATH", "0")
    a, b = netns.build_pair(lab, "kubespan-wg", "kubespan-wg")
    netns.ping(a.ns, INNER4[1])
    sent, got, _ = netns.tcp_transfer(b.ns, a.ns, INNER4[1], 2 << 20)
    assert sent == got
    a.daemon.stop()
    assert "C fast path" not in a.daemon.output()
