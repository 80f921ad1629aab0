"""Boot the kernel-WireGuard VM once and run every guest test inside it.

This is how `./run test` covers kernel mode; scripts/vm-tests.sh does the same from
the command line. Missing qemu, virtme-ng, busybox or a kernel with the wireguard
module is a failure, not a skip.
"""

from __future__ import annotations

import sys

import pytest

from tests.vm import harness

pytestmark = [pytest.mark.vm, pytest.mark.timeout(harness.DEFAULT_TIMEOUT + 120)]


def test_facilities_present() -> None:
    assert not harness.missing_tools(), "the VM harness needs: " + "; ".join(
        harness.missing_tools()
    )
    kernel = harness.find_kernel()
    assert kernel.is_file()


def test_guest_suite_passes_in_vm(capsys: pytest.CaptureFixture[str]) -> None:
    args = [*harness.default_args(), "-ra"]
    with capsys.disabled():  # stream the VM's output live; it takes minutes
        try:
            result = harness.run_in_vm(args, out=sys.stdout)
        except harness.VmError as e:
            pytest.fail(f"the kernel VM gave no result: {e}")
    tail = "\n".join(result.output.splitlines()[-40:])
    assert result.returncode == 0, f"guest tests failed (exit {result.returncode}):\n{tail}"
    assert " passed" in tail and " failed" not in tail
