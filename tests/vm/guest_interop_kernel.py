"""Our daemon against the kernel's WireGuard (runs inside the VM): 20 MB of TCP each
way over IPv4 and IPv6 inner addresses arrive with the sha256 they left with, with
our TUN offloads on (the default) and forced off."""

from __future__ import annotations

import pytest

from tests import netns as nx
from tests.netns import INNER4, INNER6

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

TRANSFER = 20 * 1000 * 1000  # the VM has no KVM: every byte is emulated


@pytest.mark.parametrize("offload", ["1", "0"], ids=["offload-on", "offload-off"])
def test_bulk_tcp_both_ways_with_kernel_wireguard(lab: nx.Lab, offload: str) -> None:
    # One pair carries both inner families: a daemon start costs ~20 s in the VM.
    env = {"KUBESPAN_WG_FASTPATH": "1", "KUBESPAN_WG_TUN_OFFLOAD": offload}
    a, b = nx.build_pair(lab, "kubespan-wg", "kernel", envs=(env, None))
    for family in (INNER4, INNER6):
        nx.ping(a.ns, family[1])
        for server, client, ip in ((b, a, family[1]), (a, b, family[0])):
            sent, got, seconds = nx.tcp_transfer(server.ns, client.ns, ip, TRANSFER)
            what = f"{client.daemon.kind} -> {server.daemon.kind} over {ip}"
            assert sent == got, what
            print(f"{what}: {TRANSFER * 8 / seconds / 1e6:.0f} Mbit/s")
    assert a.daemon.alive()
