"""Fixtures for tests/vm: the host-side test that boots the VM, and the guest tests
(`guest_*.py`) that the VM runs. Guest tests need a kernel with WireGuard and fail
loudly when run anywhere else. (The netns lab and leftover check: tests/conftest.py.)"""

from __future__ import annotations

import os

import pytest


def in_vm() -> bool:
    return os.environ.get("KUBESPAN_IN_VM") == "1"


@pytest.fixture(autouse=True)
def guest_tests_only_in_vm(request: pytest.FixtureRequest) -> None:
    if request.node.path.name.startswith("guest_") and not in_vm():
        pytest.fail(
            "guest tests need the kernel WireGuard VM: run them with "
            "`.venv/bin/python tests/vm/harness.py` (or scripts/vm-tests.sh)"
        )
