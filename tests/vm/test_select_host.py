"""Mode selection on this host, whose kernel has no WireGuard module."""

from __future__ import annotations

import subprocess

import pytest

from control import netlab
from control.backends.base import BackendError
from control.backends.kernel import KernelBackend
from control.backends.select import (
    PROBE_PREFIX,
    InvalidMode,
    KernelWireGuardUnavailable,
    probe_kernel_wireguard,
    select_backend,
)
from control.backends.userspace import UserspaceBackend
from control.keys import generate_private_key
from tests import netns as nx
from tests.vm.selection import select_auto

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def host_without_module() -> None:
    """These tests describe a kernel without WireGuard; say so if this one has it."""
    available, why = probe_kernel_wireguard()
    assert not available, (
        "this kernel can create wireguard links, so the host-side "
        "selection tests do not apply here: run tests/vm instead"
    )


def all_links(ns: netlab.Netns) -> str:
    root = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    return root + ns.run("ip", "-br", "link").stdout


def test_kernel_mode_fails_clearly_without_leftovers(lab: nx.Lab) -> None:
    ns = lab.netns("ksel")
    before = ns.run("ip", "-br", "link").stdout
    with pytest.raises(KernelWireGuardUnavailable) as info:
        select_backend("kernel", netns=ns.name)
    message = str(info.value)
    assert "kernel WireGuard mode requested but unavailable" in message
    assert "wireguard module is not loaded" in message
    assert "'userspace'" in message
    assert isinstance(info.value, BackendError)
    assert ns.run("ip", "-br", "link").stdout == before
    assert PROBE_PREFIX not in all_links(ns)


def test_auto_falls_back_to_userspace(lab: nx.Lab, caplog: pytest.LogCaptureFixture) -> None:
    ns, backend, reason, logged = select_auto(lab, caplog, UserspaceBackend, "userspace")
    assert reason.startswith("auto: kernel WireGuard unavailable")
    assert "not supported" in reason.lower()
    assert any(
        m.startswith("WireGuard backend: userspace (auto: kernel WireGuard unavailable")
        for m in logged
    ), logged
    assert PROBE_PREFIX not in all_links(ns)


def test_userspace_mode_needs_no_probe() -> None:
    backend, reason = select_backend("userspace")
    assert isinstance(backend, UserspaceBackend)
    assert reason == "userspace mode requested"


@pytest.mark.parametrize("mode", ["", "Kernel", "wireguard-go", None, 1])
def test_unknown_mode_is_refused(mode: object) -> None:
    with pytest.raises(InvalidMode, match="unknown WireGuard mode"):
        select_backend(mode)  # type: ignore[arg-type]


def test_kernel_backend_up_fails_cleanly_here(lab: nx.Lab) -> None:
    ns = lab.netns("ksel")
    backend = KernelBackend(netns=ns.name)
    name = netlab.unique_name("kswg", 8)
    with pytest.raises(BackendError, match="cannot create wireguard link"):
        backend.up(name, generate_private_key(), 51820, 0x20, 1420)
    assert name not in ns.run("ip", "-br", "link").stdout
    assert backend.link is None
    backend.down()  # nothing to do, no error
