"""Seal/open a batch of 1420-byte packets: our transport path vs a bare EVP loop.

Ours does everything a real packet needs (padding, header, counter, in-place seal; on
open the header checks, replay pre-check, tag, replay update); the baseline is the same
EVP calls on the same buffers with nothing around them.  Setup work (restoring the
buffers, a fresh replay window) happens outside the timed region.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from kubespan_dp import _batch as bt
from kubespan_dp import _fastpath as fp

BATCH = 64
SIZE = 1420
ROUNDS = 3000
WARMUP_ROUNDS = 50

KEY = os.urandom(32)
PLAIN = bt.PacketBatch(BATCH)
PLAIN.fill_plaintext(os.urandom(SIZE))


def _keypair() -> fp.Keypair:
    return fp.Keypair(KEY, KEY, 1, 1)


def _time(
    benchmark,
    run: Callable[..., object],
    args: tuple,
    batch: bt.PacketBatch,
    source: bt.PacketBatch,
) -> None:
    """Time run(*args) over ROUNDS rounds; before each, untimed, `batch` gets `source`'s packets."""
    benchmark.pedantic(
        run,
        args=args,
        setup=lambda: batch.copy_from(source),
        rounds=ROUNDS,
        warmup_rounds=WARMUP_ROUNDS,
    )


def test_ours_seal(benchmark, record_median) -> None:
    kp, batch = _keypair(), bt.PacketBatch(BATCH)
    _time(benchmark, bt.seal_batch, (kp, batch, SIZE), batch, PLAIN)
    assert batch.statuses() == [bt.STATUS_OK] * BATCH
    record_median("ours_seal", benchmark)


def test_evp_seal(benchmark, record_median) -> None:
    key, batch = bt.AEADKey(KEY), bt.PacketBatch(BATCH)
    _time(benchmark, bt.evp_baseline_seal, (key, batch), batch, PLAIN)
    record_median("evp_seal", benchmark)


def test_ours_open(benchmark, record_median) -> None:
    sealed = bt.PacketBatch(BATCH)
    sealed.copy_from(PLAIN)
    bt.seal_batch(_keypair(), sealed, SIZE)
    batch = bt.PacketBatch(BATCH)
    state: dict[str, fp.Keypair] = {}

    def setup():
        batch.copy_from(sealed)
        state["kp"] = _keypair()  # a fresh replay window each round
        return (state["kp"], batch), {}

    benchmark.pedantic(
        lambda kp, b: bt.open_batch(kp, b), setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS
    )
    assert batch.statuses() == [bt.STATUS_OK] * BATCH
    record_median("ours_open", benchmark)


def test_evp_open(benchmark, record_median) -> None:
    key = bt.AEADKey(KEY)
    sealed = bt.PacketBatch(BATCH)
    sealed.copy_from(PLAIN)
    bt.evp_baseline_seal(key, sealed)
    batch = bt.PacketBatch(BATCH)
    _time(benchmark, bt.evp_baseline_open, (key, batch), batch, sealed)
    assert bt.evp_baseline_open(key, sealed) == BATCH
    record_median("evp_open", benchmark)
