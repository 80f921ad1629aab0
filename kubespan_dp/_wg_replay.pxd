"""The RFC 6479 replay window of wireguard-go's replay.go, in C (inline only)."""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from kubespan_dp._wg_defs cimport *


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
