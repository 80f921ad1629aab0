"""The namespace harness itself, proven with wireguard-go on both sides, and the two
wireguard-go builds the tests run (control.netlab.wggo)."""

from __future__ import annotations

import os
import signal

import pytest

from control import netlab
from control.netlab import wggo
from tests import netns

pytestmark = pytest.mark.netns


def test_both_wireguard_go_builds_are_installed() -> None:
    """scripts/bootstrap.sh installs both; which is which is checked on the way."""
    modern, old = wggo.find("modern"), wggo.find("old")
    assert modern.path != old.path
    assert modern.package, modern  # its snapshot date is what tells it is modern
    assert old.version == "v0.0.20220316", old


@pytest.mark.parametrize("kind", list(netns.WGGO_KINDS), ids=list(netns.WGGO_IDS.values()))
@pytest.mark.parametrize("outer", ["4", "6"])
def test_wireguard_go_pair_pings(lab: netns.Lab, outer: str, kind: str) -> None:
    a, b = netns.build_pair(lab, kind, kind, outer=outer)
    netns.ping(a.ns, netns.INNER4[1])
    netns.ping(b.ns, netns.INNER6[0])
    dump = a.dump()
    assert dump[1][0] == b.public_key
    assert int(dump[1][4]) > 0  # latest handshake


def test_lab_cleans_up() -> None:
    with netns.Lab() as lab:
        a, b = netns.build_pair(lab, "wireguard-go", "wireguard-go")
        names = {a.ns.name, b.ns.name}
        sockets = [netns.uapi_path(a.ifname), netns.uapi_path(b.ifname)]
        assert all(p.exists() for p in sockets)
    assert not names & set(netlab.list_namespaces())
    assert not any(p.exists() for p in sockets)


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGABRT])
def test_a_crashed_daemon_fails_its_test(lab: netns.Lab, sig: signal.Signals) -> None:
    """A daemon that died of a crash (or, under scripts/asan.sh, of a sanitizer report)
    makes the lab's cleanup raise, so its test fails even if nothing else noticed."""
    ns = lab.netns("crash")
    d = netns.start_daemon(ns, netlab.unique_name("wg", 8), "kubespan-wg")
    os.kill(d.proc.pid, sig)
    with pytest.raises(netns.DaemonCrashed):
        d.finish()
    assert not netns.uapi_path(d.ifname).exists()
