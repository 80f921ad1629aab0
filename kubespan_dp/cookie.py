"""Handshake DoS protection: mac1/mac2, cookie replies and a per-source rate limiter.

* mac1 = MAC(HASH("mac1----" || receiver's static public key), msg[:mac1]) is
  always required: it proves the sender knows whom it is talking to.
* mac2 = MAC(cookie, msg[:mac2]) is only demanded while the receiver is under
  load. The cookie is MAC(R_m, source address bytes), R_m a random secret
  rotated every two minutes, so only a sender who can receive at that address
  can learn it. It travels in a cookie reply, encrypted with XChaCha20-Poly1305
  under HASH("cookie--" || static public key) with the mac1 it answers as AD.

The source address bytes are those of Go's ``netip.AddrPort.MarshalBinary``
(the 4 or 16 address bytes, then the port little endian), as wireguard-go uses.
Time (``now``, seconds) and randomness are passed in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

from . import crypto
from .messages import MAC_SIZE, CookieReply
from .noise import LABEL_COOKIE, LABEL_MAC1

COOKIE_REFRESH_TIME = 120.0

# Rate limiter (wireguard-go ratelimiter.go): tokens are nanoseconds of credit.
PACKETS_PER_SECOND = 20
PACKETS_BURSTABLE = 5
_PACKET_COST = 1_000_000_000 // PACKETS_PER_SECOND
_MAX_TOKENS = _PACKET_COST * PACKETS_BURSTABLE
_GC_AGE = 1.0


def source_bytes(address: tuple[str, int]) -> bytes:
    """Address bytes then port (u16 little endian), the input of the cookie MAC."""
    ip, port = address
    return ipaddress.ip_address(ip).packed + int(port).to_bytes(2, "little")


def _keys(public_key: bytes) -> tuple[bytes, bytes]:
    return crypto.hash_(LABEL_MAC1, public_key), crypto.hash_(LABEL_COOKIE, public_key)


def _mac_offsets(msg: bytes) -> tuple[int, int]:
    smac2 = len(msg) - MAC_SIZE
    return smac2 - MAC_SIZE, smac2


class CookieChecker:
    """Our side: verify mac1/mac2 of incoming handshakes and make cookie replies."""

    def __init__(self, rng: Callable[[int], bytes]) -> None:
        self._rng = rng
        self._mac1_key: bytes | None = None
        self._cookie_key = bytes(32)
        self._secret = bytes(32)
        self._secret_set: float | None = None

    def init(self, public_key: bytes | None) -> None:
        """(Re)key for our static public key; None disables handshakes entirely."""
        if public_key is None:
            self._mac1_key = None
        else:
            self._mac1_key, self._cookie_key = _keys(public_key)
        self._secret_set = None

    def check_mac1(self, msg: bytes) -> bool:
        if self._mac1_key is None or len(msg) < 2 * MAC_SIZE:
            return False
        smac1, smac2 = _mac_offsets(msg)
        return crypto.constant_time_equal(crypto.mac(self._mac1_key, msg[:smac1]), msg[smac1:smac2])

    def _secret_valid(self, now: float) -> bool:
        return self._secret_set is not None and now - self._secret_set <= COOKIE_REFRESH_TIME

    def check_mac2(self, msg: bytes, source: tuple[str, int], now: float) -> bool:
        if not self._secret_valid(now) or len(msg) < 2 * MAC_SIZE:
            return False
        try:
            src = source_bytes(source)
        except (TypeError, ValueError):
            return False
        cookie = crypto.mac(self._secret, src)
        _, smac2 = _mac_offsets(msg)
        return crypto.constant_time_equal(crypto.mac(cookie, msg[:smac2]), msg[smac2:])

    def create_reply(self, msg: bytes, receiver: int, source: tuple[str, int], now: float) -> bytes:
        """A cookie reply (64 bytes) to the handshake message ``msg`` from ``source``."""
        if not self._secret_valid(now):
            self._secret = self._rng(32)
            self._secret_set = now
        cookie = crypto.mac(self._secret, source_bytes(source))
        smac1, smac2 = _mac_offsets(msg)
        nonce = self._rng(crypto.XNONCE_LEN)
        sealed = crypto.xaead_seal(self._cookie_key, nonce, cookie, msg[smac1:smac2])
        return CookieReply(receiver, nonce, sealed).encode()


class CookieGenerator:
    """Per-peer side: add mac1 (and mac2 while we hold a fresh cookie) to what we send."""

    def __init__(self, peer_public_key: bytes) -> None:
        self._mac1_key, self._cookie_key = _keys(peer_public_key)
        self.cookie = bytes(16)
        self.cookie_set: float | None = None
        self.last_mac1: bytes | None = None

    def consume_reply(self, nonce: bytes, sealed_cookie: bytes, now: float) -> bool:
        """Store the cookie from a reply to our last handshake; False if it does not open."""
        if self.last_mac1 is None:
            return False
        try:
            cookie = crypto.xaead_open(self._cookie_key, nonce, sealed_cookie, self.last_mac1)
        except crypto.AuthenticationError:
            return False
        self.cookie = cookie
        self.cookie_set = now
        return True

    def add_macs(self, msg: bytes, now: float) -> bytes:
        """``msg`` with its last 32 bytes replaced by mac1 and mac2 (zero without a cookie)."""
        smac1, smac2 = _mac_offsets(msg)
        mac1 = crypto.mac(self._mac1_key, msg[:smac1])
        self.last_mac1 = mac1
        body = msg[:smac1] + mac1
        if self.cookie_set is None or now - self.cookie_set > COOKIE_REFRESH_TIME:
            return body + bytes(MAC_SIZE)
        return body + crypto.mac(self.cookie, body)


@dataclass
class _Bucket:
    last: float
    tokens: int


@dataclass
class RateLimiter:
    """Token bucket per source IP: 20 handshakes per second, burst 5."""

    table: dict[str, _Bucket] = field(default_factory=dict)
    _last_gc: float = float("-inf")

    def allow(self, ip: str, now: float) -> bool:
        self._collect(now)
        entry = self.table.get(ip)
        if entry is None:
            self.table[ip] = _Bucket(now, _MAX_TOKENS - _PACKET_COST)
            return True
        entry.tokens = min(entry.tokens + int((now - entry.last) * 1e9), _MAX_TOKENS)
        entry.last = now
        if entry.tokens > _PACKET_COST:
            entry.tokens -= _PACKET_COST
            return True
        return False

    def _collect(self, now: float) -> None:
        # Forget sources quiet for over a second (a full bucket again), once a second.
        if now - self._last_gc < _GC_AGE:
            return
        self._last_gc = now
        for ip in [ip for ip, e in self.table.items() if now - e.last > _GC_AGE]:
            del self.table[ip]
