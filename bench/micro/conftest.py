"""Collects the medians of the crypto micro-benchmarks and prints ours / EVP ratios.

Run: .venv/bin/python -m pytest bench/micro -p no:cacheprovider
"""

from __future__ import annotations

import pytest

# name -> median seconds per call (one call = one batch)
MEDIANS: dict[str, float] = {}
PAIRS = [("seal", "ours_seal", "evp_seal"), ("open", "ours_open", "evp_open")]


@pytest.fixture
def record_median():
    def record(name: str, benchmark) -> None:
        MEDIANS[name] = benchmark.stats.stats.median

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    from bench.micro.test_crypto_batch import BATCH, SIZE

    if not MEDIANS:
        return
    tr = terminalreporter
    tr.section(f"fast path vs plain EVP loop (batch of {BATCH} x {SIZE} B)")
    for label, ours, base in PAIRS:
        if ours in MEDIANS and base in MEDIANS:
            gbps_ours = BATCH * SIZE * 8 / MEDIANS[ours] / 1e9
            gbps_base = BATCH * SIZE * 8 / MEDIANS[base] / 1e9
            tr.write_line(
                f"{label}: ours {gbps_ours:6.2f} Gbit/s  plain EVP {gbps_base:6.2f} Gbit/s"
                f"  ratio {MEDIANS[base] / MEDIANS[ours]:.3f}x"
            )
