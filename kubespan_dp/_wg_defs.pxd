"""WireGuard wire constants (from the generated _wg_constants.h), slot statuses and
relaxed atomics shared by the C packet path (inline only: compiled into each module
that cimports it)."""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

# The protocol constants come from kubespan_dp/constants.py, the module the Python
# core imports: setup.py writes them into this header (KS_<name>).
cdef extern from "_wg_constants.h":
    const int TAG_LEN "KS_TAG_SIZE"
    const int HEADER_LEN "KS_TRANSPORT_HEADER_SIZE"   # type(4) | receiver index(4) | counter(8)
    const int OVERHEAD "KS_TRANSPORT_MIN_SIZE"        # header + tag
    const uint32_t MSG_INITIATION "KS_INITIATION"
    const uint32_t MSG_RESPONSE "KS_RESPONSE"
    const uint32_t MSG_COOKIE_REPLY "KS_COOKIE_REPLY"
    const uint32_t MSG_TRANSPORT "KS_TRANSPORT"
    const int INITIATION_SIZE "KS_INITIATION_SIZE"
    const int RESPONSE_SIZE "KS_RESPONSE_SIZE"
    const int COOKIE_REPLY_SIZE "KS_COOKIE_REPLY_SIZE"
    const int PAD_MULTIPLE "KS_PADDING_MULTIPLE"
    const uint64_t REJECT_AFTER_MESSAGES "KS_REJECT_AFTER_MESSAGES"
    const uint64_t REKEY_AFTER_MESSAGES "KS_REKEY_AFTER_MESSAGES"
    const double REKEY_AFTER_TIME "KS_REKEY_AFTER_TIME"
    const double REJECT_AFTER_TIME "KS_REJECT_AFTER_TIME"
    const double KEEPALIVE_TIMEOUT "KS_KEEPALIVE_TIMEOUT"
    const double REKEY_TIMEOUT "KS_REKEY_TIMEOUT"
    const int RING_BLOCKS "KS_RING_BLOCKS"            # RFC 6479 window of replay.go
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
    if kind == MSG_INITIATION:
        return INITIATION_SIZE
    if kind == MSG_RESPONSE:
        return RESPONSE_SIZE
    if kind == MSG_COOKIE_REPLY:
        return COOKIE_REPLY_SIZE
    return -1
