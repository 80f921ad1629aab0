"""Crypto lanes in the daemon: KUBESPAN_WG_CRYPTO_LANES=1 (the loop threads alone)
and 4 (more helpers than this machine has CPUs) carry bulk TCP intact both ways,
against ourselves and the modern wireguard-go."""

from __future__ import annotations

import pytest

from tests import netns
from tests.netns import INNER4, INNER6

pytestmark = pytest.mark.netns

OURS = "kubespan-wg"


@pytest.fixture(autouse=True)
def fastpath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBESPAN_WG_FASTPATH", "1")


@pytest.mark.parametrize("lanes", ["1", "4"])
@pytest.mark.parametrize("other", [OURS, "wireguard-go"])
def test_bulk_both_ways(lab: netns.Lab, lanes: str, other: str) -> None:
    env = {"KUBESPAN_WG_CRYPTO_LANES": lanes}
    a, b = netns.build_pair(lab, OURS, other, envs=(env, env if other == OURS else None))
    for server, client, ip in ((b, a, INNER4[1]), (a, b, INNER6[0])):
        sent, got, _ = netns.tcp_transfer(server.ns, client.ns, ip, 100 * 1000 * 1000)
        assert sent == got
    assert a.daemon.alive() and b.daemon.alive()
