"""The relay's routing, sans-I/O: a datagram and its source in, a destination (or None) out.

The relay never decrypts, changes or creates a message: each datagram is forwarded as it
came, to at most one address, or dropped and counted by reason. Its state:

    nodes     public key -> (address, last registration): from registrations
    pending   initiator's sender index -> (initiator address, responder address):
              from each initiation forwarded, until the response (or PENDING_TTL)
    sessions  receiver index -> (address to forward to, the only address allowed to
              send with that index): both directions, from each response forwarded;
              they end SESSION_TTL after the handshake (WireGuard rejects a keypair
              after 180 s), the next handshake makes new ones

How each message is routed:

    registration  genuine, timestamp newer than the key's last one and within
                  REGISTRATION_WINDOW of our clock -> nodes (nothing is sent back)
    initiation    the registered node whose mac1 key (HASH("mac1----" || its public
                  key)) verifies the message's mac1 -> its address; remember pending
    response      pending[receiver index], only from that handshake's responder ->
                  the initiator; the pair of sessions is created
    cookie reply  sessions[receiver index] (from its peer), else pending (from the
                  responder) -> the other side
    data          sessions[receiver index], only from its peer -> the other side

So the relay only ever sends to an address that recently sent it a valid registration
or took part in a handshake it forwarded. Every table has a size cap (when full, new
entries are refused, existing ones are never evicted by strangers) and every source a
token bucket: one for handshakes and registrations (mac1 checks cost a MAC per
registered node), a larger one for data.

`now` is wall-clock seconds (registrations carry wall-clock time).
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from control.discovery.ratelimit import TokenBuckets
from control.relay import registration
from kubespan_dp import crypto
from kubespan_dp.messages import (
    COOKIE_REPLY,
    COOKIE_REPLY_SIZE,
    INITIATION,
    INITIATION_SIZE,
    MAC_SIZE,
    RESPONSE,
    RESPONSE_SIZE,
    TRANSPORT,
    TRANSPORT_MIN_SIZE,
)
from kubespan_dp.noise import LABEL_MAC1

Address = tuple  # (host, port) as the socket reports it (IPv6 may add flow info, scope)

NODE_TTL = 120.0  # a node registers every ~20 s
REGISTRATION_WINDOW = 60.0  # allowed clock difference between a node and the relay
PENDING_TTL = 10.0  # an initiation waits REKEY_TIMEOUT (5 s) for its response
SESSION_TTL = 240.0  # REJECT_AFTER_TIME (180 s) and a margin

# Why a datagram was dropped (the metrics' label values).
MALFORMED = "malformed"  # not a WireGuard message nor a registration (type or size)
RATE_LIMITED = "rate_limited"
BAD_REGISTRATION = "bad_registration"  # wrong MAC: not from a cluster member
STALE_REGISTRATION = "stale_registration"  # replayed or out of the time window
UNKNOWN_RECIPIENT = "unknown_recipient"  # an initiation for no registered node
UNKNOWN_INDEX = "unknown_index"  # no handshake or session with that receiver index
WRONG_SOURCE = "wrong_source"  # a known index sent from another address (spoofed)
TABLE_FULL = "table_full"
LOOP = "loop"  # would go back where it came from
DROP_REASONS = (
    MALFORMED,
    RATE_LIMITED,
    BAD_REGISTRATION,
    STALE_REGISTRATION,
    UNKNOWN_RECIPIENT,
    UNKNOWN_INDEX,
    WRONG_SOURCE,
    TABLE_FULL,
    LOOP,
)
MESSAGE_NAMES = {
    INITIATION: "initiation",
    RESPONSE: "response",
    COOKIE_REPLY: "cookie_reply",
    TRANSPORT: "data",
}

_U32 = struct.Struct("<I")
_MAC1_END = INITIATION_SIZE - MAC_SIZE
_MAC1_START = _MAC1_END - MAC_SIZE


@dataclass(frozen=True)
class Limits:
    max_nodes: int = 4096  # a cluster has at most 1,024 affiliates
    max_pending: int = 16384
    max_sessions: int = 65536
    handshake_rate: float = 50.0  # handshakes + registrations per second per source
    handshake_burst: int = 200  # a node starting with many relayed peers
    data_rate: float = 200_000.0  # data packets per second per source
    data_burst: int = 20_000
    max_sources: int = 65536  # rate-limit buckets kept (idle ones are forgotten)


@dataclass
class _Node:
    address: Address
    last_seen: float
    last_time_ns: int
    mac1_key: bytes


@dataclass(frozen=True)
class _Pending:
    initiator: Address
    responder: Address
    created: float


@dataclass(frozen=True)
class _Route:
    to: Address
    source: Address
    created: float


class RelayCore:
    def __init__(self, registration_key: bytes, limits: Limits = Limits()) -> None:
        self.limits = limits
        self._registration_key = registration_key
        self._nodes: collections.OrderedDict[bytes, _Node] = collections.OrderedDict()
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._sessions: collections.OrderedDict[int, _Route] = collections.OrderedDict()
        self._handshake_rate = TokenBuckets(
            limits.handshake_rate, limits.handshake_burst, limits.max_sources
        )
        self._data_rate = TokenBuckets(limits.data_rate, limits.data_burst, limits.max_sources)
        self.forwarded: collections.Counter[str] = collections.Counter()  # by message name
        self.forwarded_bytes = 0
        self.registrations = 0
        self.dropped: collections.Counter[str] = collections.Counter()  # by reason

    # -- what the server and the metrics read ------------------------------------------

    def nodes(self) -> dict[bytes, Address]:
        return {key: node.address for key, node in self._nodes.items()}

    def table_sizes(self) -> dict[str, int]:
        return {
            "nodes": len(self._nodes),
            "pending": len(self._pending),
            "sessions": len(self._sessions),
            "sources": len(self._handshake_rate) + len(self._data_rate),
        }

    # -- routing -----------------------------------------------------------------------

    def receive(self, data: bytes, source: Address, now: float) -> Address | None:
        """Where to forward `data` (unchanged) that came from `source`; None: dropped."""
        if len(data) < TRANSPORT_MIN_SIZE:  # a registration is longer too
            return self._drop(MALFORMED)
        kind = _U32.unpack_from(data)[0]
        if kind == TRANSPORT:  # the common case first
            return self._data(data, source, now)
        if not self._allow(self._handshake_rate, source, now):
            return self._drop(RATE_LIMITED)
        if kind == INITIATION and len(data) == INITIATION_SIZE:
            return self._initiation(data, source, now)
        if kind == RESPONSE and len(data) == RESPONSE_SIZE:
            return self._response(data, source, now)
        if kind == COOKIE_REPLY and len(data) == COOKIE_REPLY_SIZE:
            return self._cookie_reply(data, source, now)
        if data.startswith(registration.TYPE):
            self._register(data, source, now)
            return None
        return self._drop(MALFORMED)

    def _register(self, data: bytes, source: Address, now: float) -> None:
        decoded = registration.decode(self._registration_key, data)
        if decoded is None:
            self._drop(BAD_REGISTRATION)
            return
        public_key, time_ns = decoded
        node = self._nodes.get(public_key)
        too_far = abs(time_ns / 1e9 - now) > REGISTRATION_WINDOW
        if too_far or (node is not None and time_ns <= node.last_time_ns):
            self._drop(STALE_REGISTRATION)
            return
        if node is None:
            if len(self._nodes) >= self.limits.max_nodes:
                self._drop(TABLE_FULL)
                return
            node = _Node(source, now, time_ns, crypto.hash_(LABEL_MAC1, public_key))
            self._nodes[public_key] = node
        node.address, node.last_seen, node.last_time_ns = source, now, time_ns
        self._nodes.move_to_end(public_key)
        self.registrations += 1

    def _initiation(self, data: bytes, source: Address, now: float) -> Address | None:
        body, mac1 = data[:_MAC1_START], data[_MAC1_START:_MAC1_END]
        recipient = None
        for node in self._nodes.values():
            if now - node.last_seen <= NODE_TTL and crypto.constant_time_equal(
                crypto.mac(node.mac1_key, body), mac1
            ):
                recipient = node.address
                break
        if recipient is None:
            return self._drop(UNKNOWN_RECIPIENT)
        if recipient == source:
            return self._drop(LOOP)
        sender = _U32.unpack_from(data, 4)[0]
        if sender not in self._pending and len(self._pending) >= self.limits.max_pending:
            self.expire(now)
            if len(self._pending) >= self.limits.max_pending:
                return self._drop(TABLE_FULL)
        self._pending[sender] = _Pending(source, recipient, now)
        self._pending.move_to_end(sender)
        return self._forward(data, INITIATION, recipient)

    def _response(self, data: bytes, source: Address, now: float) -> Address | None:
        sender, receiver = struct.unpack_from("<II", data, 4)
        pending = self._pending.get(receiver)
        if pending is None or now - pending.created > PENDING_TTL:
            return self._drop(UNKNOWN_INDEX)
        if pending.responder != source:
            return self._drop(WRONG_SOURCE)
        new = sum(1 for index in (receiver, sender) if index not in self._sessions)
        if len(self._sessions) + new > self.limits.max_sessions:
            self.expire(now)
            if len(self._sessions) + new > self.limits.max_sessions:
                return self._drop(TABLE_FULL)
        del self._pending[receiver]
        for index, route in (
            (receiver, _Route(pending.initiator, source, now)),
            (sender, _Route(source, pending.initiator, now)),
        ):
            self._sessions[index] = route
            self._sessions.move_to_end(index)
        return self._forward(data, RESPONSE, pending.initiator)

    def _cookie_reply(self, data: bytes, source: Address, now: float) -> Address | None:
        receiver = _U32.unpack_from(data, 4)[0]
        route = self._route(receiver, now)
        if route is not None:
            if route.source != source:
                return self._drop(WRONG_SOURCE)
            return self._forward(data, COOKIE_REPLY, route.to)
        pending = self._pending.get(receiver)
        if pending is None or now - pending.created > PENDING_TTL:
            return self._drop(UNKNOWN_INDEX)
        if pending.responder != source:
            return self._drop(WRONG_SOURCE)
        return self._forward(data, COOKIE_REPLY, pending.initiator)

    def _data(self, data: bytes, source: Address, now: float) -> Address | None:
        route = self._route(_U32.unpack_from(data, 4)[0], now)
        if route is None:
            return self._drop(UNKNOWN_INDEX)
        if route.source != source:
            return self._drop(WRONG_SOURCE)
        if not self._allow(self._data_rate, source, now):
            return self._drop(RATE_LIMITED)
        return self._forward(data, TRANSPORT, route.to)

    def _route(self, index: int, now: float) -> _Route | None:
        route = self._sessions.get(index)
        return route if route is not None and now - route.created <= SESSION_TTL else None

    # -- bookkeeping -------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Forget what is too old (call every second or so); tables are kept oldest first."""
        _pop_old(self._nodes, lambda n: now - n.last_seen > NODE_TTL)
        _pop_old(self._pending, lambda p: now - p.created > PENDING_TTL)
        _pop_old(self._sessions, lambda r: now - r.created > SESSION_TTL)
        self._handshake_rate.gc(now)
        self._data_rate.gc(now)

    def _allow(self, buckets: TokenBuckets, source: Address, now: float) -> bool:
        return buckets.reserve(source, now, 0.0) is not None

    def _forward(self, data: bytes, kind: int, to: Address) -> Address:
        self.forwarded[MESSAGE_NAMES[kind]] += 1
        self.forwarded_bytes += len(data)
        return to

    def _drop(self, reason: str) -> Address | None:  # None: typed for `return self._drop(...)`
        self.dropped[reason] += 1
        return None


def _pop_old(table: collections.OrderedDict[Any, Any], old: Callable[[Any], bool]) -> None:
    while table:
        key, value = next(iter(table.items()))
        if not old(value):
            return
        del table[key]
