"""Fixtures for the fast-path tests (network namespaces via tests/netns.py)."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import netns  # noqa: E402


@pytest.fixture
def lab() -> Iterator[netns.Lab]:
    with netns.Lab() as lab:
        yield lab
    assert not lab.errors, f"cleanup errors: {lab.errors}"
