# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The C packet path: WireGuard transport crypto on OpenSSL EVP with the GIL released.

Layers, top to bottom of this file:

1. ``AEADKey``: one ChaCha20-Poly1305 key, single payloads (tests, odd jobs).
2. ``PacketBatch``: a block of fixed-size packet slots.  A plaintext slot keeps its
   IP packet 16 bytes in, so sealing writes the WireGuard header in front and the
   tag behind *in place*; opening leaves the plaintext at the same spot.
3. ``Keypair``: both directions of one session (EVP contexts made once), the send
   counter and the RFC 6479 replay window, all in C.  ``seal_batch`` /
   ``open_batch`` run a whole batch with the GIL released.
4. ``evp_baseline_seal`` / ``evp_baseline_open``: the plainest possible EVP loop over
   the same buffers; the benchmarks compare against it (the crypto limit).
5. ``PacketLoop``: TUN <-> UDP threads (see the section header below).
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_CIPHER_CTX
    ctypedef struct EVP_CIPHER
    const EVP_CIPHER *EVP_chacha20_poly1305()
    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, void *impl,
                          const unsigned char *key, const unsigned char *iv, int enc)
    int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                         const unsigned char *inp, int inl)
    int EVP_CipherFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr)
    int EVP_CTRL_AEAD_SET_TAG
    int EVP_CTRL_AEAD_GET_TAG

cdef extern from "openssl/crypto.h" nogil:
    void OPENSSL_cleanse(void *ptr, size_t len)

cdef extern from *:
    """
    #define KS_TAG_LEN 16
    #define KS_HEADER_LEN 16            /* type(4) | receiver index(4) | counter(8) */
    #define KS_OVERHEAD 32              /* header + tag */
    #define KS_MSG_TRANSPORT 4
    #define KS_PAD_MULTIPLE 16
    /* wireguard-go device/constants.go */
    #define KS_REJECT_AFTER_MESSAGES 18446744073709543423ULL  /* 2^64 - 2^13 - 1 */
    #define KS_REKEY_AFTER_MESSAGES 1152921504606846976ULL    /* 2^60 */
    /* RFC 6479 window as in wireguard-go replay.go: 128 blocks of 64 bits. */
    #define KS_RING_BLOCKS 128
    #define KS_WINDOW_SIZE ((KS_RING_BLOCKS - 1) * 64)       /* 8128 */
    """
    const int TAG_LEN "KS_TAG_LEN"
    const int HEADER_LEN "KS_HEADER_LEN"
    const int OVERHEAD "KS_OVERHEAD"
    const uint32_t MSG_TRANSPORT "KS_MSG_TRANSPORT"
    const int PAD_MULTIPLE "KS_PAD_MULTIPLE"
    const uint64_t REJECT_AFTER_MESSAGES "KS_REJECT_AFTER_MESSAGES"
    const uint64_t REKEY_AFTER_MESSAGES "KS_REKEY_AFTER_MESSAGES"
    const int RING_BLOCKS "KS_RING_BLOCKS"
    const uint64_t WINDOW_SIZE "KS_WINDOW_SIZE"

# Per-slot status after seal_batch / open_batch / the loop.
STATUS_OK = 0
STATUS_BAD_TAG = 1
STATUS_REPLAY = 2
STATUS_MALFORMED = 3
STATUS_WRONG_INDEX = 4
STATUS_EXHAUSTED = 5
STATUS_EMPTY = 6
cdef enum:
    ST_OK = 0
    ST_BAD_TAG = 1
    ST_REPLAY = 2
    ST_MALFORMED = 3
    ST_WRONG_INDEX = 4
    ST_EXHAUSTED = 5
    ST_EMPTY = 6


class AuthenticationError(ValueError):
    """The Poly1305 tag did not verify."""


# ---------------------------------------------------------------------------
# Small C helpers

cdef inline void _nonce(uint8_t *out, uint64_t counter) noexcept nogil:
    # WireGuard nonce: 4 zero bytes then the 64-bit counter, little endian.
    cdef int i
    memset(out, 0, 4)
    for i in range(8):
        out[4 + i] = <uint8_t>((counter >> (8 * i)) & 0xFF)


cdef inline void _put_le32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline uint32_t _get_le32(const uint8_t *p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void _put_le64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = (v >> (8 * i)) & 0xFF


cdef inline uint64_t _get_le64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v |= (<uint64_t>p[i]) << (8 * i)
    return v


cdef inline Py_ssize_t _padded_len(Py_ssize_t n, Py_ssize_t mtu) noexcept nogil:
    # wireguard-go calculatePaddingSize: round up to 16, never beyond the MTU.
    cdef Py_ssize_t last = n
    cdef Py_ssize_t padded
    if mtu == 0:
        return (n + PAD_MULTIPLE - 1) & ~(PAD_MULTIPLE - 1)
    if last > mtu:
        last = last % mtu
    padded = (last + PAD_MULTIPLE - 1) & ~(PAD_MULTIPLE - 1)
    if padded > mtu:
        padded = mtu
    return n + (padded - last)


cdef inline int _seal_one(EVP_CIPHER_CTX *ctx, uint64_t counter, uint8_t *data,
                          int n) noexcept nogil:
    """Encrypt data[0:n] in place and write the tag at data[n]. 1 on success."""
    cdef uint8_t nonce[12]
    cdef int outl = 0, ok = 1
    _nonce(nonce, counter)
    ok &= EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 1)
    if n:
        ok &= EVP_CipherUpdate(ctx, data, &outl, data, n)
    ok &= EVP_CipherFinal_ex(ctx, data + n, &outl)
    ok &= EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, data + n)
    return ok


cdef inline int _open_one(EVP_CIPHER_CTX *ctx, uint64_t counter, uint8_t *data,
                          int n) noexcept nogil:
    """Decrypt data[0:n] in place, verifying the tag at data[n]. 1 if authentic."""
    cdef uint8_t nonce[12]
    cdef uint8_t scratch[16]
    cdef int outl = 0, ok = 1
    _nonce(nonce, counter)
    ok &= EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 0)
    if n:
        ok &= EVP_CipherUpdate(ctx, data, &outl, data, n)
    ok &= EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, data + n)
    ok &= EVP_CipherFinal_ex(ctx, scratch, &outl) > 0
    return ok


cdef EVP_CIPHER_CTX *_new_ctx(const uint8_t *key, int enc) except NULL:
    cdef EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new()
    if ctx == NULL:
        raise MemoryError()
    if EVP_CipherInit_ex(ctx, EVP_chacha20_poly1305(), NULL, key, NULL, enc) != 1:
        EVP_CIPHER_CTX_free(ctx)
        raise RuntimeError("EVP_CipherInit_ex failed")
    return ctx


cdef bytes _key32(object key, str what):
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise ValueError(f"{what} must be 32 bytes")
    return bytes(key)


# ---------------------------------------------------------------------------
# 1. AEADKey: single payloads

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
# 2. PacketBatch: fixed-size slots, packets edited in place

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


# ---------------------------------------------------------------------------
# 3. Keypair: one session's keys, counter and replay window in C

cdef struct replay_t:
    uint64_t last
    uint64_t ring[128]


cdef inline bint _replay_check(const replay_t *r, uint64_t counter) noexcept nogil:
    # Would the window accept this counter?  No state change (cheap pre-check
    # before spending a decryption on a packet that will be dropped anyway).
    if counter >= REJECT_AFTER_MESSAGES:
        return False
    if counter > r.last:
        return True
    if r.last - counter > WINDOW_SIZE:
        return False
    return (r.ring[(counter >> 6) & (RING_BLOCKS - 1)] >> (counter & 63)) & 1 == 0


cdef inline bint _replay_update(replay_t *r, uint64_t counter) noexcept nogil:
    # wireguard-go ReplayFilter.ValidateCounter; call only after the tag verified.
    cdef uint64_t index_block, current, diff, i, old, new
    if counter >= REJECT_AFTER_MESSAGES:
        return False
    index_block = counter >> 6
    if counter > r.last:
        current = r.last >> 6
        diff = index_block - current
        if diff > RING_BLOCKS:
            diff = RING_BLOCKS
        i = current + 1
        while i <= current + diff:
            r.ring[i & (RING_BLOCKS - 1)] = 0
            i += 1
        r.last = counter
    elif r.last - counter > WINDOW_SIZE:
        return False
    index_block &= RING_BLOCKS - 1
    old = r.ring[index_block]
    new = old | (<uint64_t>1 << (counter & 63))
    r.ring[index_block] = new
    return old != new


cdef struct keypair_t:
    EVP_CIPHER_CTX *seal_ctx
    EVP_CIPHER_CTX *open_ctx
    uint64_t send_counter        # next nonce to use; touched by the sending thread only
    uint32_t local_index         # our index: peers address their packets with it
    uint32_t remote_index        # theirs: goes into the header of what we send
    double created               # monotonic seconds
    bint is_initiator
    replay_t replay              # touched by the receiving thread only
    uint64_t rx_packets          # authenticated packets received on this keypair


cdef int _seal_batch(keypair_t *kp, PacketBatch b, Py_ssize_t mtu, int start,
                     int stop) noexcept nogil:
    """Seal slots [start, stop) holding plaintext at offset 16, in place."""
    cdef int i, sealed = 0
    cdef uint8_t *slot
    cdef Py_ssize_t n, padded
    cdef uint64_t counter
    for i in range(start, stop):
        slot = b.slot(i)
        n = b.length[i]
        padded = _padded_len(n, mtu)
        if padded + OVERHEAD > b.slot_size:
            b.status[i] = ST_MALFORMED
            continue
        counter = kp.send_counter
        if counter >= REJECT_AFTER_MESSAGES:
            b.status[i] = ST_EXHAUSTED
            continue
        kp.send_counter = counter + 1
        if padded > n:
            memset(slot + HEADER_LEN + n, 0, padded - n)
        _put_le32(slot, MSG_TRANSPORT)
        _put_le32(slot + 4, kp.remote_index)
        _put_le64(slot + 8, counter)
        if _seal_one(kp.seal_ctx, counter, slot + HEADER_LEN, <int>padded) != 1:
            b.status[i] = ST_MALFORMED
            continue
        b.off[i] = 0
        b.length[i] = <uint32_t>(padded + OVERHEAD)
        b.status[i] = ST_OK
        sealed += 1
    return sealed


cdef inline int _open_slot(keypair_t *kp, uint8_t *slot, uint32_t n) noexcept nogil:
    """Open one message at slot[0:n] in place; plaintext lands at slot+16."""
    cdef uint64_t counter
    if n < OVERHEAD or _get_le32(slot) != MSG_TRANSPORT:
        return ST_MALFORMED
    if _get_le32(slot + 4) != kp.local_index:
        return ST_WRONG_INDEX
    counter = _get_le64(slot + 8)
    if not _replay_check(&kp.replay, counter):
        return ST_REPLAY
    if _open_one(kp.open_ctx, counter, slot + HEADER_LEN, <int>(n - OVERHEAD)) != 1:
        return ST_BAD_TAG
    if not _replay_update(&kp.replay, counter):
        return ST_REPLAY
    kp.rx_packets += 1
    return ST_OK


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


cdef class Keypair:
    """Both directions of one WireGuard session, ready for the C packet path.

    The send counter and the replay window live here in C; the Python core hands the
    keys over once (KeypairInstalled) and never sends on this keypair itself.
    """
    cdef keypair_t *kp

    def __cinit__(self, send_key, receive_key, uint32_t local_index,
                  uint32_t remote_index, *, bint is_initiator=False, double created=0.0,
                  uint64_t send_counter=0):
        cdef bytes sk = _key32(send_key, "send key")
        cdef bytes rk = _key32(receive_key, "receive key")
        self.kp = <keypair_t *>calloc(1, sizeof(keypair_t))
        if self.kp == NULL:
            raise MemoryError()
        self.kp.seal_ctx = _new_ctx(<const uint8_t *>sk, 1)
        self.kp.open_ctx = _new_ctx(<const uint8_t *>rk, 0)
        self.kp.local_index = local_index
        self.kp.remote_index = remote_index
        self.kp.is_initiator = is_initiator
        self.kp.created = created
        self.kp.send_counter = send_counter

    def __dealloc__(self):
        if self.kp != NULL:
            if self.kp.seal_ctx != NULL:
                EVP_CIPHER_CTX_free(self.kp.seal_ctx)
            if self.kp.open_ctx != NULL:
                EVP_CIPHER_CTX_free(self.kp.open_ctx)
            OPENSSL_cleanse(self.kp, sizeof(keypair_t))
            free(self.kp)

    @property
    def local_index(self) -> int:
        return self.kp.local_index

    @property
    def remote_index(self) -> int:
        return self.kp.remote_index

    @property
    def send_counter(self) -> int:
        return self.kp.send_counter

    @property
    def is_initiator(self) -> bool:
        return self.kp.is_initiator

    @property
    def created(self) -> float:
        return self.kp.created

    @property
    def rx_packets(self) -> int:
        return self.kp.rx_packets

    def seal_batch(self, PacketBatch batch not None, int mtu=1420) -> int:
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
            n = _seal_batch(self.kp, batch, mtu, 0, batch.count)
        return n

    def open_batch(self, PacketBatch batch not None) -> int:
        """Open every message slot in place: tag, then replay window (updated only
        after the tag verified).  Returns how many opened; see ``statuses()``."""
        cdef int n
        with nogil:
            n = _open_batch(self.kp, batch)
        return n

    def replay_check(self, uint64_t counter) -> bool:
        """Would the receive window accept ``counter`` (no state change)?"""
        return _replay_check(&self.kp.replay, counter)

    def replay_update(self, uint64_t counter) -> bool:
        """Record ``counter`` as received; False if replayed or too old."""
        return _replay_update(&self.kp.replay, counter)


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
