"""Fixtures for tests/vm: the host-side test that boots the VM, and the guest tests
(`guest_*.py`) that the VM runs. Guest tests need a kernel with WireGuard and fail
loudly when run anywhere else."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import netns  # noqa: E402


def in_vm() -> bool:
    return os.environ.get("KUBESPAN_IN_VM") == "1"


@pytest.fixture(autouse=True)
def guest_tests_only_in_vm(request: pytest.FixtureRequest) -> None:
    if request.node.path.name.startswith("guest_") and not in_vm():
        pytest.fail("guest tests need the kernel WireGuard VM: run them with "
                    "`.venv/bin/python tests/vm/harness.py` (or scripts/vm-tests.sh)")


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    yield
    left = netns.leftovers()
    assert not left, f"left behind: {left}"


@pytest.fixture
def lab() -> Iterator[netns.Lab]:
    with netns.Lab() as lab:
        yield lab
    assert not lab.errors, f"cleanup errors: {lab.errors}"
