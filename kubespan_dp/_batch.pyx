# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Test and benchmark helpers for the C packet path (not used by the daemon).

1. ``PacketBatch``: a block of fixed-size packet slots.  A plaintext slot keeps its
   IP packet 16 bytes in, so sealing writes the WireGuard header in front and the
   tag behind *in place*; opening leaves the plaintext at the same spot.
2. ``seal_batch`` / ``open_batch``: a whole batch on a ``_fastpath.Keypair`` with the
   GIL released, through THE seal and open the packet loop uses (``_wg_keypair``);
   ``replay_check`` / ``replay_update`` reach its C replay window.
3. ``AEADKey``: one ChaCha20-Poly1305 key, single payloads.
4. ``evp_baseline_seal`` / ``evp_baseline_open``: the plainest possible EVP loop over
   the same buffers; the benchmarks compare against it (the crypto limit).
5. ``constants()``: the protocol constants as compiled into C, for the test that
   they agree with the Python core's.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset

from kubespan_dp._fastpath cimport Keypair
from kubespan_dp._wg_defs cimport *
from kubespan_dp._wg_crypto cimport *
from kubespan_dp._wg_replay cimport *
from kubespan_dp._wg_keypair cimport *

# Per-slot status after seal_batch / open_batch / the loop.
STATUS_OK = 0
STATUS_BAD_TAG = 1
STATUS_REPLAY = 2
STATUS_MALFORMED = 3
STATUS_WRONG_INDEX = 4
STATUS_EXHAUSTED = 5
STATUS_SEAL_FAILED = 6

class AuthenticationError(ValueError):
    """The Poly1305 tag did not verify."""


# ---------------------------------------------------------------------------
# 1. PacketBatch: fixed-size slots, packets edited in place

cdef class PacketBatch:
    """``capacity`` slots of ``slot_size`` bytes.

    Each slot has an offset and a length.  Plaintext (an IP packet read from TUN, or
    the result of opening) sits at offset 16; a WireGuard message (sealed, or read
    from UDP) sits at offset 0.
    """
    cdef uint8_t *buf
    cdef uint32_t *off
    cdef uint32_t *length
    cdef uint8_t *status
    cdef readonly int capacity
    cdef readonly int slot_size
    cdef public int count

    def __cinit__(self, int capacity=64, int slot_size=2048):
        if capacity < 1 or capacity > 4096:
            raise ValueError("capacity must be 1..4096")
        if slot_size < 64 or slot_size > 65536 + 64 or slot_size % 64:
            raise ValueError("slot_size must be a multiple of 64 in 64..65600")
        self.capacity = capacity
        self.slot_size = slot_size
        self.count = 0
        self.buf = <uint8_t *>calloc(<size_t>capacity * slot_size, 1)
        self.off = <uint32_t *>calloc(capacity, sizeof(uint32_t))
        self.length = <uint32_t *>calloc(capacity, sizeof(uint32_t))
        self.status = <uint8_t *>calloc(capacity, 1)
        if self.buf == NULL or self.off == NULL or self.length == NULL or self.status == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.buf != NULL:
            OPENSSL_cleanse(self.buf, <size_t>self.capacity * self.slot_size)
        free(self.buf)
        free(self.off)
        free(self.length)
        free(self.status)

    def __len__(self):
        return self.count

    cdef int _add(self, const uint8_t[::1] data, uint32_t off) except -1:
        cdef Py_ssize_t n = data.shape[0]
        if self.count >= self.capacity:
            raise IndexError("batch is full")
        # Room for the header, 15 bytes of padding and the tag around plaintext.
        if n + OVERHEAD + PAD_MULTIPLE > self.slot_size:
            raise ValueError("packet does not fit a slot")
        cdef int i = self.count
        cdef uint8_t *slot = self.buf + <size_t>i * self.slot_size
        if n:
            memcpy(slot + off, &data[0], n)
        self.off[i] = off
        self.length[i] = <uint32_t>n
        self.status[i] = ST_OK
        self.count += 1
        return i

    def add_plaintext(self, const uint8_t[::1] packet) -> int:
        """Queue an IP packet (or b"" for a keepalive) for sealing; returns its slot."""
        return self._add(packet, HEADER_LEN)

    def add_message(self, const uint8_t[::1] message) -> int:
        """Queue a received WireGuard message for opening; returns its slot."""
        return self._add(message, 0)

    def fill_plaintext(self, const uint8_t[::1] packet, int count=-1):
        """Reset the batch to ``count`` copies (default: all slots) of one packet."""
        cdef int i
        self.count = 0
        if count < 0:
            count = self.capacity
        for i in range(count):
            self._add(packet, HEADER_LEN)

    def clear(self):
        self.count = 0

    def copy_from(self, PacketBatch other not None):
        """Make this batch an exact copy of ``other`` (same geometry required)."""
        if other.capacity != self.capacity or other.slot_size != self.slot_size:
            raise ValueError("batches differ in geometry")
        memcpy(self.buf, other.buf, <size_t>self.capacity * self.slot_size)
        memcpy(self.off, other.off, self.capacity * sizeof(uint32_t))
        memcpy(self.length, other.length, self.capacity * sizeof(uint32_t))
        memcpy(self.status, other.status, self.capacity)
        self.count = other.count

    def get(self, int i) -> bytes:
        """The bytes currently in slot ``i``."""
        if i < 0 or i >= self.count:
            raise IndexError(i)
        return PyBytes_FromStringAndSize(
            <char *>(self.buf + <size_t>i * self.slot_size + self.off[i]), self.length[i])

    def status_of(self, int i) -> int:
        if i < 0 or i >= self.count:
            raise IndexError(i)
        return self.status[i]

    def packets(self) -> list:
        return [self.get(i) for i in range(self.count)]

    def statuses(self) -> list:
        return [self.status[i] for i in range(self.count)]

    def total_bytes(self) -> int:
        cdef int i
        cdef Py_ssize_t t = 0
        for i in range(self.count):
            t += self.length[i]
        return t

    # Raw access for the loop and the baselines.
    cdef inline uint8_t *slot(self, int i) noexcept nogil:
        return self.buf + <size_t>i * self.slot_size


cdef int _seal_batch(keypair_t *kp, PacketBatch b, Py_ssize_t mtu, int start,
                     int stop) noexcept nogil:
    """Seal slots [start, stop) holding plaintext at offset 16, in place."""
    cdef int i, st, sealed = 0
    cdef uint32_t length
    for i in range(start, stop):
        st = _seal_slot(kp, b.slot(i), b.length[i], mtu, b.slot_size, &length)
        b.status[i] = st
        if st == ST_OK:
            b.off[i] = 0
            b.length[i] = length
            sealed += 1
    return sealed


cdef int _open_batch(keypair_t *kp, PacketBatch b) noexcept nogil:
    cdef int i, st, opened = 0
    for i in range(b.count):
        if b.off[i] != 0:
            b.status[i] = ST_MALFORMED
            continue
        st = _open_slot(kp, b.slot(i), b.length[i])
        b.status[i] = st
        if st == ST_OK:
            b.off[i] = HEADER_LEN
            b.length[i] -= OVERHEAD
            opened += 1
    return opened


# ---------------------------------------------------------------------------
# 2. The batch API on a _fastpath.Keypair

def seal_batch(Keypair keypair not None, PacketBatch batch not None,
               int mtu=1420) -> int:
    """Seal every plaintext slot into a transport message in place.

    Each slot gets the next send counter, padding to 16 (capped at ``mtu``), the
    header and the tag.  Returns how many were sealed; the others carry a status.
    """
    cdef int n, i
    if mtu < 0:
        raise ValueError("mtu must be >= 0")
    for i in range(batch.count):
        if batch.off[i] != HEADER_LEN:
            raise ValueError(f"slot {i} does not hold plaintext")
    with nogil:
        n = _seal_batch(keypair.kp, batch, mtu, 0, batch.count)
    return n


def open_batch(Keypair keypair not None, PacketBatch batch not None) -> int:
    """Open every message slot in place: tag, then replay window (updated only
    after the tag verified).  Returns how many opened; see ``statuses()``."""
    cdef int n
    with nogil:
        n = _open_batch(keypair.kp, batch)
    return n


def replay_check(Keypair keypair not None, uint64_t counter) -> bool:
    """Would the receive window accept ``counter`` (no state change)?"""
    return _replay_check(&keypair.kp.replay, counter)


def replay_update(Keypair keypair not None, uint64_t counter) -> bool:
    """Record ``counter`` as received; False if replayed or too old."""
    return _replay_update(&keypair.kp.replay, counter)


# ---------------------------------------------------------------------------
# 3. AEADKey: single payloads

cdef class AEADKey:
    """One direction's ChaCha20-Poly1305 key with its EVP contexts made once."""
    cdef EVP_CIPHER_CTX *_seal
    cdef EVP_CIPHER_CTX *_open

    def __cinit__(self, bytes key not None):
        if len(key) != 32:
            raise ValueError("ChaCha20-Poly1305 key must be 32 bytes")
        self._seal = _new_ctx(<const uint8_t *>key, 1)
        self._open = _new_ctx(<const uint8_t *>key, 0)

    def __dealloc__(self):
        # EVP_CIPHER_CTX_free clears the key schedule before freeing it.
        if self._seal != NULL:
            EVP_CIPHER_CTX_free(self._seal)
        if self._open != NULL:
            EVP_CIPHER_CTX_free(self._open)

    def seal(self, uint64_t counter, const uint8_t[::1] plaintext):
        """Return ciphertext || tag for the payload under this counter (no AAD)."""
        cdef Py_ssize_t n = plaintext.shape[0]
        out = bytearray(n + TAG_LEN)
        cdef uint8_t[::1] o = out
        cdef int ok
        if n:
            memcpy(&o[0], &plaintext[0], n)
        with nogil:
            ok = _seal_one(self._seal, counter, &o[0], <int>n)
        if ok != 1:
            raise RuntimeError("ChaCha20-Poly1305 seal failed")
        return bytes(out)

    def open(self, uint64_t counter, const uint8_t[::1] sealed):
        """Return the plaintext, or raise AuthenticationError if the tag is wrong."""
        cdef Py_ssize_t n = sealed.shape[0] - TAG_LEN
        if n < 0:
            raise AuthenticationError("sealed payload shorter than the tag")
        out = bytearray(sealed)
        cdef uint8_t[::1] o = out
        cdef int ok
        with nogil:
            ok = _open_one(self._open, counter, &o[0], <int>n)
        if ok != 1:
            raise AuthenticationError("ChaCha20-Poly1305 tag mismatch")
        return bytes(out[:n])


# ---------------------------------------------------------------------------
# 4. The crypto limit: a plain EVP loop over the same buffers

def evp_baseline_seal(AEADKey key not None, PacketBatch batch not None) -> int:
    """Seal each slot's payload in place with counter = slot number; nothing else.

    No header, padding, counters or checks: the floor our ``seal_batch`` is measured
    against.  Leaves the batch unusable for anything but this benchmark.
    """
    cdef int i, ok = 1
    cdef uint8_t *p
    with nogil:
        for i in range(batch.count):
            p = batch.slot(i) + HEADER_LEN
            ok &= _seal_one(key._seal, <uint64_t>i, p, <int>batch.length[i])
    return batch.count if ok else -1


def evp_baseline_open(AEADKey key not None, PacketBatch batch not None) -> int:
    """Open each slot sealed by ``evp_baseline_seal``, in place; returns how many
    verified.  The inverse of the seal baseline (re-seal before calling again)."""
    cdef int i, good = 0
    cdef uint8_t *p
    with nogil:
        for i in range(batch.count):
            p = batch.slot(i) + HEADER_LEN
            good += _open_one(key._open, <uint64_t>i, p, <int>batch.length[i])
    return good


# ---------------------------------------------------------------------------
# 5. The constants C was compiled with

def constants() -> dict:
    """The protocol constants compiled into C (from the generated _wg_constants.h),
    for the test that they agree with the Python core's (constants.py and the
    modules that use it)."""
    return {
        "REJECT_AFTER_MESSAGES": REJECT_AFTER_MESSAGES,
        "REKEY_AFTER_MESSAGES": REKEY_AFTER_MESSAGES,
        "REKEY_AFTER_TIME": REKEY_AFTER_TIME,
        "REJECT_AFTER_TIME": REJECT_AFTER_TIME,
        "KEEPALIVE_TIMEOUT": KEEPALIVE_TIMEOUT,
        "REKEY_TIMEOUT": REKEY_TIMEOUT,
        "RING_BLOCKS": RING_BLOCKS,
        "WINDOW_SIZE": WINDOW_SIZE,
        "TRANSPORT_HEADER_SIZE": HEADER_LEN,
        "TRANSPORT_MIN_SIZE": OVERHEAD,
        "INITIATION_SIZE": _handshake_size(1),
        "RESPONSE_SIZE": _handshake_size(2),
        "COOKIE_REPLY_SIZE": _handshake_size(3),
        "TAG_SIZE": TAG_LEN,
        "TRANSPORT": MSG_TRANSPORT,
        "PADDING_MULTIPLE": PAD_MULTIPLE,
    }
