"""The VM harness's own failure paths (cheap: none of these boots a full VM)."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from tests.vm import harness

pytestmark = pytest.mark.vm


def qemu_running(name: str) -> bool:
    out = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout
    return any(name in line and not line.startswith("Z") for line in out.splitlines())


def test_kernel_choice_has_the_wireguard_module() -> None:
    kernel = harness.find_kernel()
    version = kernel.name.removeprefix("vmlinuz-")
    assert "-rt-" not in version, "the stock Debian kernel is preferred over -rt"
    assert list((Path("/lib/modules") / version).glob(harness.WG_MODULE + "*"))


def test_boot_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = tmp_path / "vmlinuz-bogus"
    bogus.write_bytes(b"not a kernel")
    monkeypatch.setenv("KUBESPAN_VM_KERNEL", str(bogus))
    out = io.StringIO()
    with pytest.raises(harness.VmError, match="did not boot") as info:
        harness.run_in_vm(["-q"], timeout=120, out=out)
    assert not isinstance(info.value, harness.VmTimeout)
    assert "invalid kernel header" in str(info.value)  # qemu's own words are kept
    assert "booting vmlinuz-bogus" in out.getvalue()  # and everything was streamed


def test_missing_kernel_override_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBESPAN_VM_KERNEL", "/nonexistent/vmlinuz")
    with pytest.raises(harness.VmError, match="is not a file"):
        harness.run_in_vm(["-q"], timeout=60, out=io.StringIO())


def test_timeout_kills_the_vm() -> None:
    name = "kubespan-vm-timeout-test"
    with pytest.raises(harness.VmTimeout, match="exceeded 5s"):
        harness.run_in_vm(["-q"], timeout=5, out=io.StringIO(), name=name + "-x")
    assert not qemu_running(name)


def test_main_exit_codes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert harness.main(["--timeout", "3"]) == harness.EXIT_TIMEOUT
    bogus = tmp_path / "vmlinuz-bogus"
    bogus.write_bytes(b"not a kernel")
    monkeypatch.setenv("KUBESPAN_VM_KERNEL", str(bogus))
    assert harness.main([]) == harness.EXIT_NO_RESULT
