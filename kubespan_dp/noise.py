"""The Noise_IKpsk2 handshake as WireGuard uses it.

    <- s
    ...
    -> e, es, s, ss, {timestamp}
    <- e, ee, se, psk, {}

Two layers:

* ``SymmetricState`` and the four ``write_*``/``read_*`` functions are plain
  Noise (prologue and payloads are parameters), so they can be checked against
  the generic Noise test vectors;
* ``Handshake`` plus ``create_initiation`` / ``consume_initiation`` /
  ``create_response`` / ``consume_response`` / ``derive_keypair`` are
  WireGuard's per-peer state machine (wireguard-go noise-protocol.go). The
  ``consume_*`` functions only compute; they return a result that the caller
  commits, so a message that fails any check leaves no trace.

Randomness (ephemerals, indices) and the wall clock (TAI64N) are passed in.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from . import crypto
from .keypair import Keypair
from .messages import Initiation, Response

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
ZERO_KEY = bytes(32)
# At most one initiation per peer is consumed in this interval (50 per second).
HANDSHAKE_INITIATION_RATE = 1 / 50


def initial_state(prologue: bytes = IDENTIFIER) -> tuple[bytes, bytes]:
    """(chaining key, hash) after InitializeSymmetric(name) and MixHash(prologue)."""
    # The name is longer than HASHLEN, so Noise hashes it rather than padding it.
    ck = crypto.hash_(CONSTRUCTION)
    return ck, crypto.hash_(ck, prologue)


class SymmetricState:
    """Noise's chaining key and transcript hash (the cipher key is returned, not kept)."""

    __slots__ = ("ck", "h")

    def __init__(self, ck: bytes, h: bytes) -> None:
        self.ck = ck
        self.h = h

    def mix_hash(self, data: bytes) -> None:
        self.h = crypto.hash_(self.h, data)

    def mix_key(self, data: bytes) -> None:
        self.ck = crypto.kdf1(self.ck, data)

    def mix_key_with_output(self, data: bytes) -> bytes:
        self.ck, key = crypto.kdf2(self.ck, data)
        return key

    def mix_key_and_hash(self, psk: bytes) -> bytes:
        self.ck, tau, key = crypto.kdf3(self.ck, psk)
        self.mix_hash(tau)
        return key

    def encrypt_and_hash(self, key: bytes, plaintext: bytes) -> bytes:
        # Every key in the handshake is used exactly once, so the nonce is 0.
        ciphertext = crypto.aead_seal(key, 0, plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, key: bytes, ciphertext: bytes) -> bytes:
        plaintext = crypto.aead_open(key, 0, ciphertext, self.h)
        self.mix_hash(ciphertext)
        return plaintext


# --- plain Noise_IKpsk2 messages --------------------------------------------


def write_first(
    st: SymmetricState,
    s_priv: bytes,
    rs: bytes,
    e_priv: bytes,
    payload: bytes,
    static_static: bytes | None = None,
    s_pub: bytes | None = None,
) -> tuple[bytes, bytes, bytes]:
    """Initiator: -> e, es, s, ss, {payload}. Returns (e_pub, enc_static, enc_payload).

    ``static_static`` is DH(s, rs) when the caller keeps it precomputed.
    """
    st.mix_hash(rs)
    e_pub = crypto.public_key(e_priv)
    st.mix_key(e_pub)
    st.mix_hash(e_pub)
    key = st.mix_key_with_output(crypto.dh(e_priv, rs))
    enc_static = st.encrypt_and_hash(key, s_pub or crypto.public_key(s_priv))
    key = st.mix_key_with_output(static_static or crypto.dh(s_priv, rs))
    enc_payload = st.encrypt_and_hash(key, payload)
    return e_pub, enc_static, enc_payload


def read_first_static(
    st: SymmetricState, s_priv: bytes, e_pub: bytes, enc_static: bytes, s_pub: bytes | None = None
) -> bytes:
    """Responder, first half of the first message: returns the initiator's static key.
    ``s_pub`` is our static public key when the caller keeps it (saves a scalar mult)."""
    st.mix_hash(s_pub or crypto.public_key(s_priv))
    st.mix_key(e_pub)
    st.mix_hash(e_pub)
    key = st.mix_key_with_output(crypto.dh(s_priv, e_pub))
    return st.decrypt_and_hash(key, enc_static)


def read_first_payload(st: SymmetricState, static_static: bytes, enc_payload: bytes) -> bytes:
    """Responder, second half: ss (precomputed DH of the two static keys), {payload}."""
    key = st.mix_key_with_output(static_static)
    return st.decrypt_and_hash(key, enc_payload)


def write_second(
    st: SymmetricState, e_priv: bytes, re: bytes, rs: bytes, psk: bytes, payload: bytes
) -> tuple[bytes, bytes]:
    """Responder: <- e, ee, se, psk, {payload}. Returns (e_pub, enc_payload)."""
    e_pub = crypto.public_key(e_priv)
    st.mix_hash(e_pub)
    st.mix_key(e_pub)
    st.mix_key(crypto.dh(e_priv, re))
    st.mix_key(crypto.dh(e_priv, rs))
    key = st.mix_key_and_hash(psk)
    return e_pub, st.encrypt_and_hash(key, payload)


def read_second(
    st: SymmetricState, e_priv: bytes, s_priv: bytes, re: bytes, psk: bytes, enc_payload: bytes
) -> bytes:
    """Initiator: reads <- e, ee, se, psk, {payload}."""
    st.mix_hash(re)
    st.mix_key(re)
    st.mix_key(crypto.dh(e_priv, re))
    st.mix_key(crypto.dh(s_priv, re))
    key = st.mix_key_and_hash(psk)
    return st.decrypt_and_hash(key, enc_payload)


def split(ck: bytes) -> tuple[bytes, bytes]:
    """(initiator->responder key, responder->initiator key)."""
    return crypto.kdf2(ck, b"")


# --- WireGuard's per-peer handshake -----------------------------------------


class HandshakeState(enum.Enum):
    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


class Reason(enum.Enum):
    """Why a handshake failed; the values are the core's ``dropped`` counter names."""

    INVALID_INITIATION = "invalid_initiation"  # did not decrypt, or no usable DH with the peer
    UNKNOWN_PEER = "unknown_peer"
    REPLAY = "handshake_replay"  # timestamp not newer than the last one accepted
    FLOOD = "handshake_flood"  # more than one initiation per HANDSHAKE_INITIATION_RATE
    INVALID_RESPONSE = "invalid_response"  # did not authenticate, or none was expected
    NOT_POSSIBLE = "handshake_not_possible"  # we cannot create a message (keys or state)


class HandshakeError(ValueError):
    """A handshake message was rejected or could not be made; ``reason`` says why."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(eq=False)
class Handshake:
    """Handshake state kept per peer (wireguard-go's Handshake struct)."""

    remote_static: bytes
    preshared_key: bytes = field(default=ZERO_KEY, repr=False)
    # DH(our static, their static), precomputed; all zero means unusable.
    static_static: bytes = field(default=ZERO_KEY, repr=False)
    state: HandshakeState = HandshakeState.ZEROED
    ck: bytes = field(default=ZERO_KEY, repr=False)
    h: bytes = field(default=ZERO_KEY, repr=False)
    local_ephemeral: bytes = field(default=ZERO_KEY, repr=False)
    local_index: int = 0
    remote_index: int = 0
    remote_ephemeral: bytes = ZERO_KEY
    last_timestamp: bytes = bytes(12)  # newest TAI64N accepted from this peer
    last_initiation_consumption: float | None = None
    last_sent_handshake: float | None = None

    def precompute(self, local_private: bytes | None) -> None:
        try:
            self.static_static = (
                crypto.dh(local_private, self.remote_static) if local_private else ZERO_KEY
            )
        except crypto.InvalidPublicKey:
            self.static_static = ZERO_KEY

    def clear(self) -> None:
        self.local_ephemeral = ZERO_KEY
        self.remote_ephemeral = ZERO_KEY
        self.ck = ZERO_KEY
        self.h = ZERO_KEY
        self.local_index = 0
        self.state = HandshakeState.ZEROED


def create_initiation(
    hs: Handshake,
    local_private: bytes,
    ephemeral_private: bytes,
    timestamp: bytes,
    sender_index: int,
    local_public: bytes | None = None,
) -> Initiation:
    """Build the first message (macs zero; the cookie generator adds them)."""
    if hs.static_static == ZERO_KEY:
        raise HandshakeError(Reason.NOT_POSSIBLE, "no usable static-static secret for this peer")
    ck, h = initial_state()
    st = SymmetricState(ck, h)
    try:
        e_pub, enc_static, enc_ts = write_first(
            st,
            local_private,
            hs.remote_static,
            ephemeral_private,
            timestamp,
            hs.static_static,
            local_public,
        )
    except crypto.InvalidPublicKey as exc:
        raise HandshakeError(Reason.NOT_POSSIBLE, str(exc)) from None
    _sent(hs, st, ephemeral_private, sender_index, HandshakeState.INITIATION_CREATED)
    return Initiation(sender_index, e_pub, enc_static, enc_ts)


def _sent(
    hs: Handshake, st: SymmetricState, ephemeral: bytes, index: int, state: HandshakeState
) -> None:
    """Keep what writing our handshake message produced."""
    hs.ck, hs.h = st.ck, st.h
    hs.local_ephemeral = ephemeral
    hs.local_index = index
    hs.state = state


P = TypeVar("P")


@dataclass
class _Consumed:
    """A verified handshake message; nothing of it reaches ``handshake`` before commit()."""

    handshake: Handshake
    ck: bytes = field(repr=False)
    h: bytes = field(repr=False)
    sender: int

    def _apply(self, state: HandshakeState) -> Handshake:
        hs = self.handshake
        hs.ck, hs.h = self.ck, self.h
        hs.remote_index = self.sender
        hs.state = state
        return hs


@dataclass
class ConsumedInitiation(_Consumed, Generic[P]):
    """A verified initiation, from ``peer``, not yet applied to its handshake."""

    peer: P
    ephemeral: bytes
    timestamp: bytes
    now: float

    def commit(self) -> None:
        hs = self._apply(HandshakeState.INITIATION_CONSUMED)
        hs.remote_ephemeral = self.ephemeral
        if self.timestamp > hs.last_timestamp:
            hs.last_timestamp = self.timestamp
        if hs.last_initiation_consumption is None or self.now > hs.last_initiation_consumption:
            hs.last_initiation_consumption = self.now


def consume_initiation(
    msg: Initiation,
    local_private: bytes,
    lookup_peer: Callable[[bytes], tuple[P, Handshake] | None],
    now: float,
    local_public: bytes | None = None,
) -> ConsumedInitiation[P]:
    """Verify an initiation; raises HandshakeError. Changes nothing until commit()."""
    ck, h = initial_state()
    st = SymmetricState(ck, h)
    try:
        peer_static = read_first_static(st, local_private, msg.ephemeral, msg.static, local_public)
    except (crypto.InvalidPublicKey, crypto.AuthenticationError):
        raise HandshakeError(
            Reason.INVALID_INITIATION, "initiation: static key did not decrypt"
        ) from None
    found = lookup_peer(peer_static)
    if found is None:
        raise HandshakeError(Reason.UNKNOWN_PEER, "initiation from an unknown public key")
    peer, hs = found
    if hs.static_static == ZERO_KEY:
        raise HandshakeError(
            Reason.INVALID_INITIATION, "initiation: peer has no usable static-static secret"
        )
    try:
        timestamp = read_first_payload(st, hs.static_static, msg.timestamp)
    except crypto.AuthenticationError:
        raise HandshakeError(
            Reason.INVALID_INITIATION, "initiation: timestamp did not decrypt"
        ) from None
    if not crypto.tai64n_after(timestamp, hs.last_timestamp):
        raise HandshakeError(Reason.REPLAY, "initiation replay: timestamp not newer")
    if (
        hs.last_initiation_consumption is not None
        and now - hs.last_initiation_consumption <= HANDSHAKE_INITIATION_RATE
    ):
        raise HandshakeError(Reason.FLOOD, "initiation flood")
    return ConsumedInitiation(
        hs,
        st.ck,
        st.h,
        msg.sender,
        peer=peer,
        ephemeral=msg.ephemeral,
        timestamp=timestamp,
        now=now,
    )


def create_response(hs: Handshake, ephemeral_private: bytes, sender_index: int) -> Response:
    if hs.state is not HandshakeState.INITIATION_CONSUMED:
        raise HandshakeError(Reason.NOT_POSSIBLE, "response before an initiation was consumed")
    st = SymmetricState(hs.ck, hs.h)
    try:
        e_pub, empty = write_second(
            st, ephemeral_private, hs.remote_ephemeral, hs.remote_static, hs.preshared_key, b""
        )
    except crypto.InvalidPublicKey as exc:
        raise HandshakeError(Reason.NOT_POSSIBLE, str(exc)) from None
    _sent(hs, st, ephemeral_private, sender_index, HandshakeState.RESPONSE_CREATED)
    return Response(sender_index, hs.remote_index, e_pub, empty)


@dataclass
class ConsumedResponse(_Consumed):
    """A verified response to our initiation, not yet applied."""

    def commit(self) -> None:
        self._apply(HandshakeState.RESPONSE_CONSUMED)


def consume_response(msg: Response, hs: Handshake, local_private: bytes) -> ConsumedResponse:
    """Verify a response to our initiation; raises HandshakeError, changes nothing."""
    if hs.state is not HandshakeState.INITIATION_CREATED:
        raise HandshakeError(Reason.INVALID_RESPONSE, "response without an outstanding initiation")
    st = SymmetricState(hs.ck, hs.h)
    try:
        read_second(
            st, hs.local_ephemeral, local_private, msg.ephemeral, hs.preshared_key, msg.empty
        )
    except (crypto.InvalidPublicKey, crypto.AuthenticationError):
        raise HandshakeError(Reason.INVALID_RESPONSE, "response did not authenticate") from None
    return ConsumedResponse(hs, st.ck, st.h, msg.sender)


def derive_keypair(hs: Handshake, now: float) -> Keypair:
    """Split the chaining key into a transport keypair and zero the handshake secrets."""
    if hs.state is HandshakeState.RESPONSE_CONSUMED:
        send, receive = split(hs.ck)
        is_initiator = True
    elif hs.state is HandshakeState.RESPONSE_CREATED:
        receive, send = split(hs.ck)
        is_initiator = False
    else:
        raise HandshakeError(Reason.NOT_POSSIBLE, f"cannot derive keys in state {hs.state.name}")
    keypair = Keypair(send, receive, hs.local_index, hs.remote_index, is_initiator, now)
    hs.ck = ZERO_KEY
    hs.h = ZERO_KEY
    hs.local_ephemeral = ZERO_KEY
    hs.state = HandshakeState.ZEROED
    # local_index now belongs to the keypair; the caller moves it in the index table.
    hs.local_index = 0
    return keypair


# --- local index table -------------------------------------------------------

V = TypeVar("V")


@dataclass
class IndexTable(Generic[V]):
    """Random, unique 32-bit receiver indices -> what they name (handshake or keypair)."""

    rng: Callable[[int], bytes]
    entries: dict[int, V] = field(default_factory=dict)

    def new_index(self, value: V) -> int:
        while True:
            index = int.from_bytes(self.rng(4), "little")
            if index not in self.entries:
                self.entries[index] = value
                return index

    def get(self, index: int) -> V | None:
        return self.entries.get(index)

    def replace(self, index: int, value: V) -> None:
        if index in self.entries:
            self.entries[index] = value

    def delete(self, index: int) -> None:
        self.entries.pop(index, None)

    def __len__(self) -> int:
        return len(self.entries)
