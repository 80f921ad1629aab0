"""Unit tests of discovery.

Cipher, codec, state rules with explicit time, rate limiter, snapshot file, proto freshness.
"""

from __future__ import annotations

import base64
import os

import pytest

from control.affiliate import Affiliate
from control.discovery.cipher import AffiliateCipher, CipherError, secret_key
from control.discovery.client import Backoff
from control.discovery.codec import (
    CodecError,
    decode_affiliate,
    decode_endpoint,
    encode_affiliate,
    encode_endpoint,
)
from control.discovery.proto import generate
from control.discovery.ratelimit import TokenBuckets
from control.discovery.snapshotfile import write_atomic
from control.discovery.state import LimitError, Limits, State
from control.discovery.target import parse_discovery_endpoint as parse_endpoint

from .conftest import endpoints_of, make_affiliate


def test_generated_modules_are_current():
    assert generate.stale_files() == []


def test_secret_key_forms():
    raw = os.urandom(32)
    assert secret_key(base64.b64encode(raw).decode()) == raw
    assert secret_key(raw) == raw
    for bad in ("not base64!!", base64.b64encode(b"short").decode(), b"x" * 31):
        with pytest.raises(ValueError):
            secret_key(bad)


def test_data_sealing_is_randomized_and_authenticated():
    c = AffiliateCipher(bytes(32))
    a, b = c.seal_data(b"hello"), c.seal_data(b"hello")
    assert a != b and len(a) == 12 + 5 + 16
    assert c.open_data(a) == c.open_data(b) == b"hello"
    with pytest.raises(CipherError):
        AffiliateCipher(bytes([1]) * 32).open_data(a)
    with pytest.raises(CipherError):
        c.open_data(a[:-1] + bytes([a[-1] ^ 1]))
    with pytest.raises(CipherError):
        c.open_data(b"short")


def test_endpoint_sealing_is_deterministic_and_block_sized():
    c = AffiliateCipher(bytes(32))
    v4, v6 = encode_endpoint(("10.0.0.1", 51820)), encode_endpoint(("2001:db8::1", 51820))
    assert c.seal_endpoint(v4) == c.seal_endpoint(v4)
    assert (
        len(c.seal_endpoint(v4)) == 16 and len(c.seal_endpoint(v6)) == 32
    )  # both fit the 32-byte limit
    assert c.open_endpoint(c.seal_endpoint(v6)) == v6
    for bad in (b"", b"x" * 15):
        with pytest.raises(CipherError):
            c.open_endpoint(bad)


def test_codec_round_trip_and_rejections():
    a = make_affiliate("n", 3, endpoints=(("10.0.0.3", 51820), ("2001:db8::3", 4000)))
    assert decode_affiliate(encode_affiliate(a), list(endpoints_of(a))) == a
    bare = Affiliate(node_id="plain")
    assert decode_affiliate(encode_affiliate(bare)) == bare  # no KubeSpan, no control plane
    for blob in (b"\xff\xff", b""):  # garbage, no id
        with pytest.raises(CodecError):
            decode_affiliate(blob)
    # a bad entry costs only that entry (more in test_codec.py)
    assert decode_affiliate(b"\x12\x03abc" + b"\x0a\x01n") == Affiliate(node_id="n")
    with pytest.raises(CodecError):
        decode_endpoint(b"\x0a\x04\x0a\x00\x00\x01")  # port 0
    with pytest.raises(ValueError):
        encode_endpoint(("10.0.0.1", 0))


def test_state_endpoint_merge_and_per_endpoint_expiry():
    s = State()
    s.update("c", "a", b"D", [b"e1"], ttl=10, now=0)
    s.update("c", "a", None, [b"e1", b"e2"], ttl=100, now=5)  # e1 extended, e2 added
    s.update("c", "a", None, [b"e1"], ttl=1, now=6)  # never shortens
    [v] = s.list("c")
    assert v.data == b"D" and v.endpoints == (b"e1", b"e2")
    s.update("c", "a", None, [b"e3"], ttl=20, now=10)
    s.gc(now=50)  # e3 (expired at 30) goes; affiliate lives (latest expiry 105)
    [v] = s.list("c")
    assert v.endpoints == (b"e1", b"e2")
    # The affiliate expires, and its cluster (now empty, unwatched) goes in the same run.
    assert s.gc(now=106) == (1, 1) and s.list("c") == [] and s.stats().clusters == 0


def test_state_notifications_and_overflow():
    s = State(Limits(watch_buffer=3))
    wakes = []
    snapshot, sub = s.subscribe("c", lambda: wakes.append(1))
    assert snapshot == []
    s.update("c", "a", b"1", [], 10, now=0)
    s.update("c", "a", b"1", [], 10, now=0)  # same data: no notification
    s.update("c", "a", b"2", [], 10, now=0)
    s.delete("c", "a")
    assert [(n.affiliate_id, n.affiliate and n.affiliate.data) for n in sub.queue] == [
        ("a", b"1"),
        ("a", b"2"),
        ("a", None),
    ]
    s.update("c", "b", b"x", [], 10, now=0)  # 4th queued note: overflow
    assert sub.overflowed and sub.closed and s.stats().subscriptions == 0


def test_state_refusals_change_nothing():
    s = State(Limits(affiliates_per_cluster=2, endpoints_per_affiliate=2))
    s.update("c", "a", b"A", [b"1"], 10, now=0)
    s.update("c", "b", b"B", [], 10, now=0)
    before = s.export_snapshot(0)
    for args, exhausted in [
        (("c", "z", b"Z", [], 10), True),
        (("c", "a", b"NEW", [b"2", b"3"], 10), True),
        (("c", "a", b"NEW", [], 1801), False),
        (("c", "a", b"N" * 2049, [], 10), False),
        (("", "a", b"x", [], 10), False),
    ]:
        with pytest.raises(LimitError) as info:
            s.update(*args, now=1)
        assert info.value.exhausted is exhausted
    assert s.export_snapshot(0) == before


def test_snapshot_round_trip_keeps_remaining_ttls():
    s = State()
    s.update("c", "a", b"A", [b"e" * 16], 100, now=0)
    s.update("c", "a", None, [b"f" * 16], 30, now=0)
    blob = s.export_snapshot(now=10)
    t = State()
    assert t.import_snapshot(blob, now=1000, wall_now=0) == 1
    t.gc(now=1000 + 21)  # f had 20 s left
    [v] = t.list("c")
    assert v.endpoints == (b"e" * 16,)
    t.gc(now=1000 + 91)
    assert t.list("c") == []
    with pytest.raises(ValueError):
        State().import_snapshot(b"\xff\xff\xff", now=0, wall_now=0)


def test_rate_limiter_token_bucket():
    r = TokenBuckets(rate=15, burst=60, max_keys=2)
    assert all(r.reserve("a", 0.0, 0) == 0 for _ in range(60))
    assert r.reserve("a", 0.0, 0.01) is None  # empty, wait 1/15 s exceeds budget
    assert r.reserve("a", 0.0, 1.0) == pytest.approx(1 / 15)  # waits its turn
    assert r.reserve("b", 0.0, 0) == 0  # other IPs have their own bucket
    assert r.reserve("c", 0.0, 0) is None  # table full and nothing idle to forget
    r.gc(100.0)
    assert len(r) == 0
    assert r.reserve("c", 100.0, 0) == 0


def test_write_atomic(tmp_path):
    p = tmp_path / "f"
    write_atomic(p, b"one")
    write_atomic(p, b"two")
    assert p.read_bytes() == b"two" and sorted(os.listdir(tmp_path)) == ["f"]
    assert (p.stat().st_mode & 0o777) == 0o600


def test_parse_endpoint_forms():
    assert parse_endpoint("https://discovery.talos.dev/") == ("discovery.talos.dev:443", True)
    assert parse_endpoint("http://127.0.0.1:3000") == ("127.0.0.1:3000", False)
    assert parse_endpoint("127.0.0.1:3000", insecure=True) == ("127.0.0.1:3000", False)
    assert parse_endpoint("[::1]:3000") == ("[::1]:3000", True)
    assert parse_endpoint("discovery.example") == ("discovery.example:443", True)
    for bad in ("ftp://x", "host:99999", "host:port"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_backoff_grows_with_jitter_and_resets():
    b = Backoff(initial=1.0, maximum=4.0, multiplier=2.0, jitter=0.5)
    waits = [b.next() for _ in range(6)]
    assert 0.5 <= waits[0] <= 1.5 and 1.0 <= waits[1] <= 3.0
    assert all(2.0 <= w <= 6.0 for w in waits[3:])  # capped at 4 +-50%
    b.reset()
    assert 0.5 <= b.next() <= 1.5
