"""Mode selection on a kernel that has WireGuard (runs inside the VM)."""

from __future__ import annotations

import subprocess

import pytest

from control import netlab
from control.backends.kernel import KernelBackend
from control.backends.select import PROBE_PREFIX, probe_kernel_wireguard, select_backend
from control.backends.userspace import UserspaceBackend
from control.keys import generate_private_key
from tests import netns as nx
from tests.vm.selection import select_auto

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def links(ns: netlab.Netns | None) -> str:
    argv = ["ip", "-br", "link"]
    return (ns.run(*argv) if ns else subprocess.run(argv, capture_output=True, text=True)).stdout


def test_module_is_there() -> None:
    # The VM's whole point: the plain iproute2 path works too.
    name = netlab.unique_name("kswg", 8)
    subprocess.run(["ip", "link", "add", name, "type", "wireguard"], check=True)
    subprocess.run(["ip", "link", "del", name], check=True)


def test_auto_picks_kernel(lab: nx.Lab, caplog: pytest.LogCaptureFixture) -> None:
    ns, backend, reason, logged = select_auto(lab, caplog, KernelBackend, "kernel")
    assert "kernel can create wireguard links" in reason
    assert any("WireGuard backend: kernel" in m for m in logged)
    assert PROBE_PREFIX not in links(ns)
    # What was picked works.
    link = netlab.unique_name("kswg", 8)
    backend.up(link, generate_private_key(), 51820, 0x20, 1420)
    lab.defer(backend.down)
    assert link in links(ns)


def test_auto_in_the_root_namespace() -> None:
    backend, reason = select_backend("auto")
    assert isinstance(backend, KernelBackend) and backend.netns is None
    assert PROBE_PREFIX not in links(None)
    assert probe_kernel_wireguard() == (True, "the kernel can create wireguard links")


def test_kernel_mode_succeeds(lab: nx.Lab) -> None:
    ns = lab.netns("ksel")
    backend, reason = select_backend("kernel", netns=ns.name)
    assert isinstance(backend, KernelBackend)
    assert reason.startswith("kernel mode requested")
    assert PROBE_PREFIX not in links(ns)


def test_userspace_mode_is_honoured_even_with_the_module(lab: nx.Lab) -> None:
    ns = lab.netns("ksel")
    backend, reason = select_backend("userspace", netns=ns.name)
    assert isinstance(backend, UserspaceBackend) and backend.mode == "userspace"
    assert reason == "userspace mode requested"
    assert PROBE_PREFIX not in links(ns)
