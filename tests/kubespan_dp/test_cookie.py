"""mac1/mac2, cookie replies and the per-source rate limiter."""

from __future__ import annotations

import itertools

from kubespan_dp import cookie, crypto, messages


def _rng():
    counter = itertools.count()
    return lambda n: bytes((next(counter) + i) & 0xFF for i in range(n))


SERVER_PUB = crypto.public_key(crypto.clamp(bytes(range(32))))
SRC = ("192.0.2.7", 51820)


def _initiation() -> bytes:
    return messages.Initiation(1, b"e" * 32, b"s" * 48, b"t" * 28).encode()


def test_mac1_checks_and_mac2_absent_without_cookie() -> None:
    checker = cookie.CookieChecker(_rng())
    checker.init(SERVER_PUB)
    gen = cookie.CookieGenerator(SERVER_PUB)
    msg = gen.add_macs(_initiation(), now=0.0)
    assert len(msg) == 148 and msg[-16:] == bytes(16)
    assert checker.check_mac1(msg)
    assert not checker.check_mac2(msg, SRC, now=0.0)
    flipped = bytearray(msg)
    flipped[20] ^= 1
    assert not checker.check_mac1(bytes(flipped))
    # mac1 is bound to the receiver's key.
    other = cookie.CookieChecker(_rng())
    other.init(crypto.public_key(crypto.clamp(bytes(range(1, 33)))))
    assert not other.check_mac1(msg)


def test_cookie_reply_flow_and_expiry() -> None:
    checker = cookie.CookieChecker(_rng())
    checker.init(SERVER_PUB)
    gen = cookie.CookieGenerator(SERVER_PUB)
    msg = gen.add_macs(_initiation(), now=0.0)
    reply = messages.decode(checker.create_reply(msg, 1, SRC, now=0.0))
    assert isinstance(reply, messages.CookieReply) and reply.receiver == 1
    assert gen.consume_reply(reply.nonce, reply.cookie, now=1.0)
    retry = gen.add_macs(_initiation(), now=2.0)
    assert retry[-16:] != bytes(16)
    assert checker.check_mac1(retry) and checker.check_mac2(retry, SRC, now=2.0)
    # Bound to the source address and port.
    assert not checker.check_mac2(retry, ("192.0.2.7", 51821), now=2.0)
    assert not checker.check_mac2(retry, ("192.0.2.8", 51820), now=2.0)
    # The checker's secret lives 120 s; the generator's cookie too.
    assert not checker.check_mac2(retry, SRC, now=121.0)
    assert gen.add_macs(_initiation(), now=122.0)[-16:] == bytes(16)


def test_cookie_reply_must_answer_our_last_mac1() -> None:
    checker = cookie.CookieChecker(_rng())
    checker.init(SERVER_PUB)
    gen = cookie.CookieGenerator(SERVER_PUB)
    reply_to_other = messages.decode(
        checker.create_reply(
            cookie.CookieGenerator(SERVER_PUB).add_macs(
                messages.Initiation(2, b"e" * 32, b"s" * 48, b"t" * 28).encode(), 0.0
            ),
            1,
            SRC,
            0.0,
        )
    )
    assert isinstance(reply_to_other, messages.CookieReply)
    assert not gen.consume_reply(reply_to_other.nonce, reply_to_other.cookie, 0.0)  # no mac1 yet
    gen.add_macs(_initiation(), 0.0)
    assert not gen.consume_reply(reply_to_other.nonce, reply_to_other.cookie, 0.0)
    assert gen.cookie_set is None


def test_source_bytes_layout() -> None:
    assert cookie.source_bytes(("10.0.0.1", 0x1234)) == bytes([10, 0, 0, 1, 0x34, 0x12])
    assert len(cookie.source_bytes(("fd00::1", 1))) == 18


def test_rate_limiter_burst_and_refill() -> None:
    rl = cookie.RateLimiter()
    allowed = [rl.allow("10.0.0.1", 0.0) for _ in range(10)]
    # wireguard-go semantics: the first packet plus three more from the burst credit.
    assert allowed == [True] * 4 + [False] * 6
    assert rl.allow("10.0.0.2", 0.0)  # per source
    # One packet costs 50 ms of credit and needs strictly more than that in hand.
    assert rl.allow("10.0.0.1", 0.001)  # 50 ms left + 1 ms refill
    assert not rl.allow("10.0.0.1", 0.002)  # 2 ms
    assert not rl.allow("10.0.0.1", 0.05)  # exactly 50 ms
    assert rl.allow("10.0.0.1", 0.06)
    # Long quiet: the bucket is full again (capped at the burst).
    assert [rl.allow("10.0.0.1", 100.0) for _ in range(6)] == [True] * 4 + [False] * 2
