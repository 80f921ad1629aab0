"""A handshake computes only the ephemeral public keys: our static public key is
kept by the core, not recomputed (a scalar multiplication) per handshake."""

from __future__ import annotations

import pytest

from kubespan_dp import crypto
from tests.kubespan_dp.wgpair import Pair


def test_handshake_computes_only_ephemeral_public_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    p = Pair()
    calls: list[bytes] = []
    real = crypto.public_key

    def counting(private: bytes) -> bytes:
        calls.append(private)
        return real(private)

    monkeypatch.setattr(crypto, "public_key", counting)
    p.handshake()
    assert p.peer_of(p.a).last_handshake is not None
    statics = {p.a.core.private_key, p.b.core.private_key}
    assert not statics & set(calls), "a static public key was recomputed"
    assert len(calls) == 2  # the initiator's and the responder's ephemeral
