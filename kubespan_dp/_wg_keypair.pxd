"""One WireGuard session in C (inline only): its keys, send counter and replay
window, and THE seal and open of a transport message in a slot, which the packet
loop and the test-only batch API (kubespan_dp._batch) share."""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from kubespan_dp._wg_defs cimport *
from kubespan_dp._wg_crypto cimport *
from kubespan_dp._wg_replay cimport *


cdef enum:
    # the most threads that seal (or open) for one loop direction at once: each has
    # its own EVP contexts of a keypair (a context is not shared between threads)
    CRYPTO_LANES = 4


cdef struct keypair_t:
    EVP_CIPHER_CTX *seal_ctx[CRYPTO_LANES]   # [lane]; NULL past the loop's lane count
    EVP_CIPHER_CTX *open_ctx[CRYPTO_LANES]
    uint64_t send_counter        # next nonce to use; touched by the sending thread only
    uint32_t local_index         # our index: peers address their packets with it
    uint32_t remote_index        # theirs: goes into the header of what we send
    double created               # monotonic seconds
    bint is_initiator
    replay_t replay              # touched by the receiving thread only
    uint64_t rx_packets          # authenticated packets received on this keypair
    int32_t peer                 # PacketLoop peer slot while installed there


cdef inline uint64_t _take_counter(keypair_t *kp) noexcept nogil:
    # Atomic, so the loop thread and Python (re-sealing the core's keepalives) can
    # share a keypair without ever reusing a nonce.  Saturates at the limit.
    if KS_ATOMIC_LOAD64(&kp.send_counter) >= REJECT_AFTER_MESSAGES:
        return REJECT_AFTER_MESSAGES
    return KS_ATOMIC_ADD64(&kp.send_counter, 1)


# THE seal and THE open come in steps, so the loop can run the cipher of a batch's
# packets on several threads (lanes) between a serial first step (counters, replay
# pre-check) and, for open, a serial last one (replay window, in order): _seal_slot
# and _open_slot are the steps in a row.

cdef inline int _seal_prepare(keypair_t *kp, uint8_t *slot, Py_ssize_t n, Py_ssize_t mtu,
                              Py_ssize_t room, uint32_t *sealed_len) noexcept nogil:
    """Seal, step 1: take the keypair's next counter, write the header and padding
    for the plaintext at slot+16 (n bytes); *sealed_len is the message's length.
    ST_OK, ST_MALFORMED (no room) or ST_EXHAUSTED (no counter left; untouched)."""
    cdef Py_ssize_t padded = _padded_len(n, mtu)
    cdef uint64_t counter
    if padded + OVERHEAD > room:
        return ST_MALFORMED
    counter = _take_counter(kp)
    if counter >= REJECT_AFTER_MESSAGES:
        return ST_EXHAUSTED
    if padded > n:
        memset(slot + HEADER_LEN + n, 0, padded - n)
    _put_le32(slot, MSG_TRANSPORT)
    _put_le32(slot + 4, kp.remote_index)
    _put_le64(slot + 8, counter)
    sealed_len[0] = <uint32_t>(padded + OVERHEAD)
    return ST_OK


cdef inline int _seal_crypt(keypair_t *kp, int lane, uint8_t *slot,
                            uint32_t sealed_len) noexcept nogil:
    """Seal, step 2 (any thread, its own lane): encrypt a prepared slot in place.
    ST_OK or ST_SEAL_FAILED (never send the slot: part of it may be encrypted)."""
    if _seal_one(kp.seal_ctx[lane], _get_le64(slot + 8), slot + HEADER_LEN,
                 <int>(sealed_len - OVERHEAD)) != 1:
        return ST_SEAL_FAILED
    return ST_OK


cdef inline int _seal_slot(keypair_t *kp, uint8_t *slot, Py_ssize_t n, Py_ssize_t mtu,
                           Py_ssize_t room, uint32_t *sealed_len) noexcept nogil:
    """THE seal (the loop and _batch.seal_batch both use it): the plaintext at slot+16 (n
    bytes) becomes, in place, a transport message at slot[0:*sealed_len] with the
    keypair's next counter, padding, header and tag.  ST_OK, ST_MALFORMED (no room),
    ST_EXHAUSTED (no counter left; plaintext untouched) or ST_SEAL_FAILED (never send
    the slot: part of it may be encrypted)."""
    cdef int st = _seal_prepare(kp, slot, n, mtu, room, sealed_len)
    if st != ST_OK:
        return st
    return _seal_crypt(kp, 0, slot, sealed_len[0])


cdef inline int _open_check(keypair_t *kp, const uint8_t *slot, uint32_t n) noexcept nogil:
    """Open, step 1: a transport message for this keypair whose counter the replay
    window has not seen (as of now).  ST_OK, ST_MALFORMED, ST_WRONG_INDEX, ST_REPLAY."""
    if n < OVERHEAD or _get_le32(slot) != MSG_TRANSPORT:
        return ST_MALFORMED
    if _get_le32(slot + 4) != kp.local_index:
        return ST_WRONG_INDEX
    if not _replay_check(&kp.replay, _get_le64(slot + 8)):
        return ST_REPLAY
    return ST_OK


cdef inline int _open_crypt(keypair_t *kp, int lane, uint8_t *slot, uint32_t n) noexcept nogil:
    """Open, step 2 (any thread, its own lane): decrypt in place, plaintext at slot+16.
    ST_OK or ST_BAD_TAG."""
    if _open_one(kp.open_ctx[lane], _get_le64(slot + 8), slot + HEADER_LEN,
                 <int>(n - OVERHEAD)) != 1:
        return ST_BAD_TAG
    return ST_OK


cdef inline int _open_commit(keypair_t *kp, const uint8_t *slot) noexcept nogil:
    """Open, step 3 (the receiving thread, in order): record the authenticated
    counter in the replay window; ST_REPLAY if it was taken meanwhile (a copy
    earlier in the same batch)."""
    if not _replay_update(&kp.replay, _get_le64(slot + 8)):
        return ST_REPLAY
    kp.rx_packets += 1
    return ST_OK


cdef inline int _open_slot(keypair_t *kp, uint8_t *slot, uint32_t n) noexcept nogil:
    """THE open: one message at slot[0:n] in place; plaintext lands at slot+16."""
    cdef int st = _open_check(kp, slot, n)
    if st == ST_OK:
        st = _open_crypt(kp, 0, slot, n)
    if st == ST_OK:
        st = _open_commit(kp, slot)
    return st
