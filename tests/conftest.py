"""Fixtures shared by every test directory: a
namespace lab per test, and a session-end check that nothing we made survives."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from control import netlab
from tests import netns


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the whole session: no namespace, socket or process we made survives."""
    yield
    left = netlab.leftovers()
    assert not left, f"left behind: {left}"


@pytest.fixture
def lab() -> Iterator[netns.Lab]:
    with netns.Lab() as lab:
        yield lab
    assert not lab.errors, f"cleanup errors: {lab.errors}"
