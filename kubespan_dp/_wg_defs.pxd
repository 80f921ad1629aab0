"""WireGuard wire constants, slot statuses and relaxed atomics shared by the C
packet path (inline only: compiled into each module that cimports it)."""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

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


cdef enum:
    ST_OK = 0
    ST_BAD_TAG = 1
    ST_REPLAY = 2
    ST_MALFORMED = 3
    ST_WRONG_INDEX = 4
    ST_EXHAUSTED = 5
    ST_SEAL_FAILED = 6


cdef extern from *:
    """
    #define KS_ATOMIC_OR(p, v) __atomic_fetch_or((p), (v), __ATOMIC_RELAXED)
    #define KS_ATOMIC_XCHG(p, v) __atomic_exchange_n((p), (v), __ATOMIC_RELAXED)
    #define KS_ATOMIC_ADD64(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)
    #define KS_ATOMIC_LOAD64(p) __atomic_load_n((p), __ATOMIC_RELAXED)
    #define KS_ATOMIC_STORE64(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
    """
    uint32_t KS_ATOMIC_OR(uint32_t *p, uint32_t v) nogil
    uint32_t KS_ATOMIC_XCHG(uint32_t *p, uint32_t v) nogil
    uint64_t KS_ATOMIC_ADD64(uint64_t *p, uint64_t v) nogil
    uint64_t KS_ATOMIC_LOAD64(uint64_t *p) nogil
    void KS_ATOMIC_STORE64(uint64_t *p, uint64_t v) nogil


cdef inline int _handshake_size(uint32_t kind) noexcept nogil:
    # wireguard-go receive.go: each handshake type has exactly one size
    if kind == 1:
        return 148
    if kind == 2:
        return 92
    if kind == 3:
        return 64
    return -1
