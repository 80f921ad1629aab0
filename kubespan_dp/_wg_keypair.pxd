"""One WireGuard session in C (inline only): its keys, send counter and replay
window, and THE seal and open of a transport message in a slot, which the packet
loop and the test-only batch API (kubespan_dp._batch) share."""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from kubespan_dp._wg_defs cimport *
from kubespan_dp._wg_crypto cimport *
from kubespan_dp._wg_replay cimport *


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
    int32_t peer                 # PacketLoop peer slot while installed there


cdef inline uint64_t _take_counter(keypair_t *kp) noexcept nogil:
    # Atomic, so the loop thread and Python (re-sealing the core's keepalives) can
    # share a keypair without ever reusing a nonce.  Saturates at the limit.
    if KS_ATOMIC_LOAD64(&kp.send_counter) >= REJECT_AFTER_MESSAGES:
        return REJECT_AFTER_MESSAGES
    return KS_ATOMIC_ADD64(&kp.send_counter, 1)


cdef inline int _seal_slot(keypair_t *kp, uint8_t *slot, Py_ssize_t n, Py_ssize_t mtu,
                           Py_ssize_t room, uint32_t *sealed_len) noexcept nogil:
    """THE seal (the loop and _batch.seal_batch both use it): the plaintext at slot+16 (n
    bytes) becomes, in place, a transport message at slot[0:*sealed_len] with the
    keypair's next counter, padding, header and tag.  ST_OK, ST_MALFORMED (no room),
    ST_EXHAUSTED (no counter left; plaintext untouched) or ST_SEAL_FAILED (never send
    the slot: part of it may be encrypted)."""
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
    if _seal_one(kp.seal_ctx, counter, slot + HEADER_LEN, <int>padded) != 1:
        return ST_SEAL_FAILED
    sealed_len[0] = <uint32_t>(padded + OVERHEAD)
    return ST_OK


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
