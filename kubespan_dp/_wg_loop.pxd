"""The packet loop's shared state (inline only): sizes, peer and queue entry
structs, loop_t (what the TX and RX threads and Python share), drop counting,
routing and the pushes onto the slow and handshake queues (two _wg_ring rings)."""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from kubespan_dp._wg_defs cimport *
from kubespan_dp._wg_crew cimport crew_t
from kubespan_dp._wg_keypair cimport keypair_t
from kubespan_dp._wg_os cimport *
from kubespan_dp._wg_ring cimport *
from kubespan_dp._wg_tables cimport *


# compile-time sizes (Cython 3: enums, not DEF)
cdef enum:
    LOOP_BATCH = 128          # TX slots: two TSO super-packets of ~46 segments fit
    GSO_SEGS = 64             # the kernel's UDP_MAX_SEGMENTS: most datagrams per GSO send
    SLOT_SIZE = 9216          # a slot holds a jumbo packet + 32 + padding
    TUN_READ = 65536 + 16     # a TUN read with IFF_VNET_HDR: header + up to 64 KiB
    SLOW_CAP = 512
    HS_CAP = 4096             # handshake messages waiting for Python (own queue)
    CONTROL_LEN = 96
    RX_MSGS = 32
    RX_BUF = 65536            # a GRO-coalesced datagram can be this long
    RX_CONTROL = 128
    RX_SEGS = 2048            # decrypted packets held before writing them to TUN


cdef extern from "_wg_constants.h":
    enum:
        HS_MAX "KS_INITIATION_SIZE"   # the largest handshake message (an initiation)


# flags a peer collects for Python (FLAG_* in _fastpath)
cdef enum:
    FL_ACTIVITY = 1
    FL_ENDPOINT = 2
    FL_REKEY_RX = 4

# slow-queue kinds (SLOW_* in _fastpath)
cdef enum:
    SK_DATAGRAM = 1
    SK_PACKET = 2

# drop reasons: index into loop_t.drops and _fastpath.DROP_REASONS
cdef enum:
    D_NO_ROUTE = 0
    D_INVALID_PACKET
    D_SLOW_FULL
    D_UDP_SEND
    D_REPLAY
    D_DECRYPT
    D_EXPIRED
    D_INVALID_INNER
    D_SOURCE
    D_TUN_WRITE
    D_NO_SOCKET
    D_TOO_BIG
    D_SEAL_FAILED
    D_TRUNCATED
    D_INVALID_SIZE
    D_INVALID_TYPE
    D_UNKNOWN_INDEX
    D_HS_FULL
    D_OFFLOAD                 # a TUN super-packet gso_split refuses
    D_COUNT


cdef struct peer_t:
    bint active
    keypair_t *current
    keypair_t *previous
    pthread_mutex_t ep_lock          # the endpoint is written by RX (roaming) and Python
    sockaddr_in6 ep                  # holds a sockaddr_in too
    socklen_t ep_len                 # 0: no endpoint
    uint8_t src[16]                  # local address the peer last wrote to (sticky
    uint8_t src_len                  # source, as wireguard-go): 0, 4 or 16 bytes
    uint32_t src_ifindex             # for IPv6 link-local only
    uint64_t tx_bytes
    uint64_t rx_bytes
    double last_tx_any
    double last_tx_data
    double last_rx_any
    double last_rx_data
    double next_attention
    uint32_t flags


cdef struct slow_t:
    uint8_t kind
    int32_t peer
    uint32_t length
    sockaddr_in6 addr
    socklen_t addrlen
    uint8_t local[16]                # our address it was sent to (for the reply)
    uint8_t local_len
    uint32_t local_ifindex
    uint8_t data[SLOT_SIZE]


cdef struct hs_t:
    uint32_t length
    sockaddr_in6 addr
    socklen_t addrlen
    uint8_t local[16]
    uint8_t local_len
    uint32_t local_ifindex
    uint8_t data[HS_MAX]


cdef struct loop_t:
    int tun_fd
    int sock4
    int sock6
    int stop_fd                      # eventfd: stop the threads
    int slow_fd                      # eventfd: Python has slow work
    int mtu
    volatile bint stopping
    volatile bint link_gone          # TUN reads failed for good (link deleted)
    bint no_gso                      # UDP_SEGMENT refused once: send one by one
    bint vnet_hdr                    # TUN reads/writes carry a virtio_net_hdr (offloads)
    bint uso                         # ... and the kernel takes UDP super-packets (USO)
    uint64_t gro_seed                # random key of gro_coalesce's flow hash
    pthread_rwlock_t lock
    # peers
    peer_t *peers
    int npeers
    # receiver index -> keypair (open addressing, rebuilt by Python)
    uint32_t *ix_keys
    keypair_t **ix_vals
    int ix_cap                       # power of two; 0 = empty
    # allowed IPs
    trie_node_t *nodes
    int nnodes
    int32_t root4
    int32_t root6
    # the slow queue (slow_t items) and the handshake queue (hs_t items: initiations,
    # responses and cookie replies of the right size); both wake Python on slow_fd
    ring_t slow
    ring_t hs
    # our indices of sessions the core runs and C does not (a responder's session
    # before its first packet): data on them goes to Python, on others is dropped
    uint64_t *pend_keys              # index + 1; 0 = empty slot
    int pend_cap                     # power of two; 0 = none
    uint64_t drops[D_COUNT]
    uint64_t tx_packets
    uint64_t rx_packets
    # crypto lanes: helper threads that share each batch's cipher work (_wg_crew)
    crew_t crew_tx
    crew_t crew_rx


cdef inline void _drop(loop_t *L, int reason, uint64_t n) noexcept nogil:
    # both threads count drops: atomically
    KS_ATOMIC_ADD64(&L.drops[reason], n)


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline int32_t _route(loop_t *L, const uint8_t *pkt, uint32_t n, bint source) noexcept nogil:
    # Peer owning the packet's destination (or source) address; NO_PEER if none or
    # the header is unusable.
    cdef int v
    if n < 1:
        return NO_PEER
    v = pkt[0] >> 4
    if v == 4 and n >= 20:
        return _trie_lookup(L.nodes, pkt + (12 if source else 16), 32, L.root4)
    if v == 6 and n >= 40:
        return _trie_lookup(L.nodes, pkt + (8 if source else 24), 128, L.root6)
    return NO_PEER


cdef inline int64_t _inner_length(const uint8_t *pkt, uint32_t n) noexcept nogil:
    # Total length from the IP header (to strip padding); -1 if it cannot be trusted.
    cdef uint32_t total
    if n < 1:
        return -1
    if pkt[0] >> 4 == 4:
        if n < 20:
            return -1
        total = (<uint32_t>pkt[2] << 8) | pkt[3]
        if total < 20 or total > n:
            return -1
        return total
    if pkt[0] >> 4 == 6:
        if n < 40:
            return -1
        total = 40 + ((<uint32_t>pkt[4] << 8) | pkt[5])
        if total > n:
            return -1
        return total
    return -1


cdef inline keypair_t *_index_lookup(loop_t *L, uint32_t index) noexcept nogil:
    cdef int slot = _ix_find(L.ix_keys, <const void **>L.ix_vals, L.ix_cap, index)
    return L.ix_vals[slot] if slot >= 0 else NULL


cdef inline void _signal(int fd) noexcept nogil:
    cdef uint64_t one = 1
    c_write(fd, &one, 8)


cdef inline bint _pending(loop_t *L, uint32_t index) noexcept nogil:
    cdef uint32_t mask, i
    if L.pend_cap == 0:
        return False
    mask = L.pend_cap - 1
    i = (index * 2654435761u) & mask
    while L.pend_keys[i] != 0:
        if L.pend_keys[i] == <uint64_t>index + 1:
            return True
        i = (i + 1) & mask
    return False


cdef inline void _hs_push(loop_t *L, const uint8_t *data, uint32_t n,
                          const sockaddr_in6 *addr, socklen_t addrlen, const uint8_t *local,
                          uint8_t local_len, uint32_t local_ifindex) noexcept nogil:
    cdef hs_t *e = <hs_t *>_ring_push_begin(&L.hs)
    if e == NULL:
        _drop(L, D_HS_FULL, 1)
        return
    e.length = n
    memcpy(e.data, data, n)
    e.addrlen = addrlen
    memcpy(&e.addr, addr, addrlen)
    e.local_len = local_len
    e.local_ifindex = local_ifindex
    if local_len:
        memcpy(e.local, local, local_len)
    if _ring_push_end(&L.hs):
        _signal(L.slow_fd)         # it was empty: wake Python


cdef inline void _slow_push(loop_t *L, uint8_t kind, int32_t peer, const uint8_t *data,
                            uint32_t n, const sockaddr_in6 *addr, socklen_t addrlen,
                            const uint8_t *local=NULL, uint8_t local_len=0,
                            uint32_t local_ifindex=0) noexcept nogil:
    cdef slow_t *e
    if n > SLOT_SIZE:
        _drop(L, D_TOO_BIG, 1)
        return
    e = <slow_t *>_ring_push_begin(&L.slow)
    if e == NULL:
        _drop(L, D_SLOW_FULL, 1)
        return
    e.kind = kind
    e.peer = peer
    e.length = n
    memcpy(e.data, data, n)
    e.addrlen = addrlen
    if addrlen:
        memcpy(&e.addr, addr, addrlen)
    e.local_len = local_len
    e.local_ifindex = local_ifindex
    if local_len:
        memcpy(e.local, local, local_len)
    if _ring_push_end(&L.slow):
        _signal(L.slow_fd)         # it was empty: wake Python
