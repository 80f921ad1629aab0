"""Shared by the mode-selection tests on this host (test_select_host.py, no WireGuard
module) and in the VM (guest_select.py, with it): `auto` in a fresh namespace."""

from __future__ import annotations

import logging
from typing import TypeVar

import pytest

from control.backends.kernel import KernelBackend
from control.backends.select import select_backend
from control.backends.userspace import UserspaceBackend
from control.netlab import Lab, Netns

B = TypeVar("B", KernelBackend, UserspaceBackend)


def select_auto(
    lab: Lab, caplog: pytest.LogCaptureFixture, expected: type[B], mode: str
) -> tuple[Netns, B, str, list[str]]:
    """`select_backend("auto")` for a new namespace, logging captured; asserts that it
    picked a backend of type `expected` in `mode` for that namespace. Returns the
    namespace, the backend, the reason and the messages logged."""
    ns = lab.netns("ksel")
    with caplog.at_level(logging.INFO, logger="control.backends.select"):
        backend, reason = select_backend("auto", netns=ns.name)
    assert isinstance(backend, expected) and backend.mode == mode
    assert backend.netns == ns.name
    return ns, backend, reason, [r.getMessage() for r in caplog.records]
