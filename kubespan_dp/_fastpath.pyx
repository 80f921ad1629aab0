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
from libc.string cimport memcmp, memcpy, memset

# Split by concern into inline-only .pxd files compiled into this one module:
from kubespan_dp._wg_defs cimport *      # wire constants, statuses, atomics
from kubespan_dp._wg_crypto cimport *    # EVP, nonce, THE seal/open of one payload
from kubespan_dp._wg_replay cimport *    # the replay window
from kubespan_dp._wg_tables cimport *    # allowed-IPs trie, index tables

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
# Small C helpers

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


cdef int _seal_slot(keypair_t *kp, uint8_t *slot, Py_ssize_t n, Py_ssize_t mtu,
                    Py_ssize_t room, uint32_t *sealed_len) noexcept nogil:
    """THE seal (the loop and seal_batch both use it): the plaintext at slot+16 (n
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

    The send counter and the replay window live here in C.  Once the Python core
    hands a session over (fastloop), they are the session's only ones: what the core
    still seals on it takes ``reserve_counter()``, what it still opens goes through
    ``PacketLoop.replay_check`` / ``replay_update``.
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
        return KS_ATOMIC_LOAD64(&self.kp.send_counter)

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

    def load_replay(self, uint64_t last, ring) -> None:
        """Take over a receive window as it stands: the greatest counter accepted and
        the 128 blocks of 64 bits (a Python ``ReplayWindow``'s ``state()``, the same
        layout).  For a keypair whose first packets the Python core opened before
        handing it over: C then accepts exactly what the core's window would."""
        cdef int k
        if last >= REJECT_AFTER_MESSAGES:
            raise ValueError("counter beyond the limit")
        if len(ring) != RING_BLOCKS:
            raise ValueError(f"a window has {RING_BLOCKS} blocks")
        blocks = [<uint64_t>b for b in ring]      # range-checks every block first
        for k in range(RING_BLOCKS):
            self.kp.replay.ring[k] = blocks[k]
        self.kp.replay.last = last

    def reserve_counter(self) -> int:
        """Take the next send counter (atomically); the limit means exhausted."""
        return _take_counter(self.kp)

    def expire(self) -> None:
        """Never send on this keypair again (the core expired it)."""
        KS_ATOMIC_STORE64(&self.kp.send_counter, REJECT_AFTER_MESSAGES)


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
# 5. PacketLoop: the data path between TUN and UDP, two C threads
#
# TX thread: poll TUN -> read a batch -> allowed-IPs lookup (destination) -> pick the
#   peer's current keypair -> pad + seal in place -> sendmmsg to the peer's endpoint,
#   runs of same-size datagrams to one endpoint as one UDP GSO send, from the local
#   address the peer last wrote to (sticky source, IP_PKTINFO).
# RX thread: poll the UDP sockets -> recvmmsg a batch (UDP GRO on: one buffer may hold
#   many datagrams, split here) -> receiver-index lookup -> replay pre-check -> open
#   in place -> replay update -> roam the endpoint -> strip padding -> source must map
#   to the same peer -> write to TUN.
#
# Both run with the GIL released for their whole life.  Anything they cannot finish
# (handshake and cookie messages, unknown indices, packets for a peer without a
# usable session, or one packet a second while a rekey is due) goes to the "slow
# queue" and an eventfd wakes Python, which feeds it to the sans-I/O core.  Python
# mirrors the core's keypairs, endpoints and allowed IPs into the loop under the
# write side of one rwlock; the threads hold the read side per batch.

from posix.unistd cimport close as c_close, read as c_read, write as c_write

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EINTR
        EWOULDBLOCK
        EINVAL
        EADDRNOTAVAIL
        ENETUNREACH

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum:
        CLOCK_MONOTONIC

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        unsigned short sa_family
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    int recvmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags, timespec *timeout)
    int sendmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    cmsghdr *CMSG_FIRSTHDR(msghdr *m)
    cmsghdr *CMSG_NXTHDR(msghdr *m, cmsghdr *c)
    unsigned char *CMSG_DATA(cmsghdr *c)
    size_t CMSG_SPACE(size_t n)
    size_t CMSG_LEN(size_t n)
    enum:
        AF_INET
        AF_INET6
        MSG_DONTWAIT
        MSG_TRUNC

cdef extern from *:
    """
    #ifndef SOL_UDP
    #define SOL_UDP 17
    #endif
    #ifndef UDP_SEGMENT
    #define UDP_SEGMENT 103
    #endif
    #ifndef UDP_GRO
    #define UDP_GRO 104
    #endif
    """
    enum:
        SOL_UDP
        UDP_SEGMENT
        UDP_GRO

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_IP
        IPPROTO_IPV6
        IP_PKTINFO
        IPV6_PKTINFO

cdef extern from "<netinet/in.h>" nogil:
    struct in6_addr:
        uint8_t s6_addr[16]
    struct sockaddr_in6:
        unsigned short sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_rwlockattr_init(pthread_rwlockattr_t *attr)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t *attr, int pref)
    int pthread_rwlock_init(pthread_rwlock_t *lock, const pthread_rwlockattr_t *attr)
    int pthread_rwlock_destroy(pthread_rwlock_t *lock)
    int pthread_rwlock_rdlock(pthread_rwlock_t *lock)
    int pthread_rwlock_wrlock(pthread_rwlock_t *lock)
    int pthread_rwlock_unlock(pthread_rwlock_t *lock)
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    enum:
        PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP

# wireguard-go device/constants.go, seconds
cdef double REKEY_AFTER_TIME = 120.0
cdef double REJECT_AFTER_TIME = 180.0
cdef double KEEPALIVE_TIMEOUT = 10.0
cdef double REKEY_TIMEOUT = 5.0
cdef double ATTENTION_INTERVAL = 1.0   # at most one "rekey due" hand-off per peer per second

# compile-time sizes (Cython 3: enums, not DEF)
cdef enum:
    LOOP_BATCH = 64
    SLOT_SIZE = 9216          # a slot holds a jumbo packet + 32 + padding
    SLOW_CAP = 512
    HS_CAP = 4096             # handshake messages waiting for Python (own queue)
    HS_MAX = 148              # the largest handshake message (an initiation)
    CONTROL_LEN = 96
    RX_MSGS = 32
    RX_BUF = 65536            # a GRO-coalesced datagram can be this long
    RX_CONTROL = 128
    RX_SEGS = 2048            # decrypted packets held before writing them to TUN

def constants() -> dict:
    """The protocol constants compiled into C, for the test that they agree with the
    Python core's (timers.py, replay.py, messages.py)."""
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
    }


# The largest IP packet the C loop carries (a TUN read must leave room in a slot for
# the header, up to 15 bytes of padding and the tag); larger ones are "too_big".
MAX_PACKET = SLOT_SIZE - OVERHEAD - PAD_MULTIPLE - 1

# flags a peer collects for Python (read and cleared by Python)
FLAG_ACTIVITY = 1
FLAG_ENDPOINT = 2
FLAG_REKEY_RX = 4
cdef enum:
    FL_ACTIVITY = 1
    FL_ENDPOINT = 2
    FL_REKEY_RX = 4

# slow-queue kinds
SLOW_DATAGRAM = 1      # a UDP payload for the core (handshake, cookie, unknown index)
SLOW_PACKET = 2        # an IP packet from TUN for a peer without a usable session
cdef enum:
    SK_DATAGRAM = 1
    SK_PACKET = 2

# drop counters, by reason (index into loop_t.drops)
DROP_REASONS = ("no_route", "invalid_packet", "slow_queue_full", "udp_send_failed",
                "replay", "decrypt_failed", "keypair_expired", "invalid_inner_packet",
                "source_not_allowed", "tun_write_failed", "no_socket_for_family",
                "too_big", "seal_failed", "udp_truncated", "invalid_size",
                "invalid_type", "unknown_index", "handshake_queue_full")
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


cdef struct io_t:
    # per-thread batch buffers
    uint8_t *buf                     # LOOP_BATCH * SLOT_SIZE
    uint32_t length[LOOP_BATCH]
    sockaddr_in6 addr[LOOP_BATCH]
    iovec iov[LOOP_BATCH]
    mmsghdr msgs[LOOP_BATCH]
    uint8_t src[LOOP_BATCH][16]
    uint8_t src_len[LOOP_BATCH]
    uint32_t src_ifindex[LOOP_BATCH]
    int32_t peer[LOOP_BATCH]


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
    # slow queue
    pthread_mutex_t slow_lock
    slow_t *slow
    int slow_head
    int slow_count
    # handshake queue: initiations, responses and cookie replies of the right size
    pthread_mutex_t hs_lock
    hs_t *hs
    int hs_head
    int hs_count
    # our indices of sessions the core runs and C does not (a responder's session
    # before its first packet): data on them goes to Python, on others is dropped
    uint64_t *pend_keys              # index + 1; 0 = empty slot
    int pend_cap                     # power of two; 0 = none
    uint64_t drops[D_COUNT]
    uint64_t tx_packets
    uint64_t rx_packets


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


cdef void _hs_push(loop_t *L, const uint8_t *data, uint32_t n, const sockaddr_in6 *addr,
                   socklen_t addrlen, const uint8_t *local, uint8_t local_len,
                   uint32_t local_ifindex) noexcept nogil:
    cdef hs_t *e
    cdef bint wake
    pthread_mutex_lock(&L.hs_lock)
    if L.hs_count >= HS_CAP:
        pthread_mutex_unlock(&L.hs_lock)
        _drop(L, D_HS_FULL, 1)
        return
    e = &L.hs[(L.hs_head + L.hs_count) % HS_CAP]
    e.length = n
    memcpy(e.data, data, n)
    e.addrlen = addrlen
    memcpy(&e.addr, addr, addrlen)
    e.local_len = local_len
    e.local_ifindex = local_ifindex
    if local_len:
        memcpy(e.local, local, local_len)
    wake = L.hs_count == 0
    L.hs_count += 1
    pthread_mutex_unlock(&L.hs_lock)
    if wake:
        _signal(L.slow_fd)


cdef void _slow_push(loop_t *L, uint8_t kind, int32_t peer, const uint8_t *data,
                     uint32_t n, const sockaddr_in6 *addr, socklen_t addrlen,
                     const uint8_t *local=NULL, uint8_t local_len=0,
                     uint32_t local_ifindex=0) noexcept nogil:
    cdef slow_t *e
    cdef bint wake
    if n > SLOT_SIZE:
        _drop(L, D_TOO_BIG, 1)
        return
    pthread_mutex_lock(&L.slow_lock)
    if L.slow_count >= SLOW_CAP:
        pthread_mutex_unlock(&L.slow_lock)
        _drop(L, D_SLOW_FULL, 1)
        return
    e = &L.slow[(L.slow_head + L.slow_count) % SLOW_CAP]
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
    wake = L.slow_count == 0
    L.slow_count += 1
    pthread_mutex_unlock(&L.slow_lock)
    if wake:
        _signal(L.slow_fd)


cdef inline int _wait(loop_t *L, int fd1, int fd2) noexcept nogil:
    # Block until a data fd is readable: bit 1 for fd1, bit 2 for fd2; 0 when stopping.
    cdef pollfd p[3]
    cdef int n = 1, i1 = -1, i2 = -1, ready
    p[0].fd = L.stop_fd
    p[0].events = POLLIN
    if fd1 >= 0:
        p[n].fd = fd1
        p[n].events = POLLIN
        i1 = n
        n += 1
    if fd2 >= 0:
        p[n].fd = fd2
        p[n].events = POLLIN
        i2 = n
        n += 1
    while not L.stopping:
        if poll(p, n, 1000) > 0:
            if L.stopping:
                return 0
            ready = 0
            if i1 >= 0 and p[i1].revents:
                ready |= 1
            if i2 >= 0 and p[i2].revents:
                ready |= 2
            if ready:
                return ready
    return 0


cdef void _send_plain(loop_t *L, int fd, mmsghdr *gso) noexcept nogil:
    # Resend one (possibly GSO) message as separate datagrams with no ancillary data.
    cdef mmsghdr one[LOOP_BATCH]
    cdef size_t k, n = gso.msg_hdr.msg_iovlen
    cdef int done = 0, r
    for k in range(n):
        memcpy(&one[k], gso, sizeof(mmsghdr))
        one[k].msg_hdr.msg_iov = gso.msg_hdr.msg_iov + k
        one[k].msg_hdr.msg_iovlen = 1
        one[k].msg_hdr.msg_control = NULL
        one[k].msg_hdr.msg_controllen = 0
    while done < <int>n:
        r = sendmmsg(fd, one + done, <int>n - done, 0)
        if r > 0:
            done += r
        else:
            _drop(L, D_UDP_SEND, 1)
            done += 1


cdef void _send_run(loop_t *L, int fd, mmsghdr *msgs, int32_t *peers, bint *pktinfo,
                    int n) noexcept nogil:
    # sendmmsg all n, waiting for buffer space rather than dropping (backpressure
    # for TCP inside the tunnel).
    cdef int done = 0, r, tries = 0, err
    cdef pollfd p
    cdef peer_t *peer
    while done < n:
        r = sendmmsg(fd, msgs + done, n - done, MSG_DONTWAIT)
        if r > 0:
            done += r
            tries = 0
            continue
        err = errno
        if r < 0 and (err == EAGAIN or err == EINTR) and tries < 20:   # EWOULDBLOCK == EAGAIN
            p.fd = fd
            p.events = POLLOUT
            poll(&p, 1, 50)
            tries += 1
            continue
        if pktinfo[done] and (err == EINVAL or err == EADDRNOTAVAIL or err == ENETUNREACH):
            # the local address we answered from is gone: forget it, let the
            # kernel choose (as wireguard-go's sticky sockets do)
            peer = &L.peers[peers[done]]
            pthread_mutex_lock(&peer.ep_lock)
            peer.src_len = 0
            pthread_mutex_unlock(&peer.ep_lock)
            _send_plain(L, fd, &msgs[done])
            done += 1
            continue
        if msgs[done].msg_hdr.msg_iovlen > 1 and not L.no_gso:
            # the kernel refused UDP_SEGMENT (no GSO here): never again
            L.no_gso = True
            _send_plain(L, fd, &msgs[done])
            done += 1
            continue
        # a message the kernel refuses (e.g. unreachable): skip it, counting
        # every datagram it carried (a GSO message holds up to 64)
        _drop(L, D_UDP_SEND, msgs[done].msg_hdr.msg_iovlen)
        done += 1




cdef struct gso_t:
    mmsghdr msgs[LOOP_BATCH]
    uint8_t control[LOOP_BATCH][CONTROL_LEN]
    int32_t peer[LOOP_BATCH]
    bint pktinfo[LOOP_BATCH]


cdef size_t _put_source(uint8_t *control, const uint8_t *src, uint8_t src_len,
                        uint32_t ifindex) noexcept nogil:
    # An IP_PKTINFO / IPV6_PKTINFO cmsg asking to send from our address ``src``.
    cdef cmsghdr *c = <cmsghdr *>control
    cdef uint8_t *d
    if src_len == 4:
        c.cmsg_level = IPPROTO_IP
        c.cmsg_type = IP_PKTINFO
        c.cmsg_len = CMSG_LEN(12)          # struct in_pktinfo {ifindex, spec_dst, addr}
        d = CMSG_DATA(c)
        memset(d, 0, 12)
        memcpy(d + 4, src, 4)
        return CMSG_SPACE(12)
    c.cmsg_level = IPPROTO_IPV6
    c.cmsg_type = IPV6_PKTINFO
    c.cmsg_len = CMSG_LEN(20)              # struct in6_pktinfo {addr, ifindex}
    d = CMSG_DATA(c)
    memcpy(d, src, 16)
    memcpy(d + 16, &ifindex, 4)
    return CMSG_SPACE(20)


cdef inline bint _same_dest(io_t *io, int a, int b) noexcept nogil:
    cdef const uint8_t *x = <const uint8_t *>&io.addr[a]
    cdef const uint8_t *y = <const uint8_t *>&io.addr[b]
    cdef socklen_t n = io.msgs[a].msg_hdr.msg_namelen
    cdef socklen_t k
    if n != io.msgs[b].msg_hdr.msg_namelen:
        return False
    for k in range(n):
        if x[k] != y[k]:
            return False
    return True


cdef void _send_all(loop_t *L, io_t *io, int *fds, int nsend) noexcept nogil:
    """Send the sealed batch in order.  Consecutive datagrams to one endpoint with
    one size (the last may be shorter) leave as a single UDP_SEGMENT (GSO) send: one
    trip through the stack instead of one per packet."""
    cdef gso_t g
    cdef int i = 0, j, m = 0, run_start, fd
    cdef size_t seg, total, ctl
    cdef cmsghdr *c
    while i < nsend:
        j = i + 1
        seg = io.iov[i].iov_len
        total = seg
        if not L.no_gso:
            while (j < nsend and j - i < 64 and fds[j] == fds[i]
                   and io.iov[j].iov_len <= seg and total + io.iov[j].iov_len <= 65000
                   and _same_dest(io, i, j) and io.src_len[j] == io.src_len[i]
                   and memcmp(io.src[j], io.src[i], io.src_len[i]) == 0):
                total += io.iov[j].iov_len
                j += 1
                if io.iov[j - 1].iov_len < seg:
                    break          # a short one ends the run
        memcpy(&g.msgs[m], &io.msgs[i], sizeof(mmsghdr))
        g.msgs[m].msg_hdr.msg_iov = &io.iov[i]
        g.msgs[m].msg_hdr.msg_iovlen = j - i
        g.peer[m] = io.peer[i]
        g.pktinfo[m] = io.src_len[i] != 0
        ctl = 0
        memset(g.control[m], 0, CONTROL_LEN)
        if io.src_len[i]:
            ctl = _put_source(g.control[m], io.src[i], io.src_len[i], io.src_ifindex[i])
        if j - i > 1:
            c = <cmsghdr *>(g.control[m] + ctl)
            c.cmsg_level = SOL_UDP
            c.cmsg_type = UDP_SEGMENT
            c.cmsg_len = CMSG_LEN(sizeof(uint16_t))
            (<uint16_t *>CMSG_DATA(c))[0] = <uint16_t>seg
            ctl += CMSG_SPACE(sizeof(uint16_t))
        g.msgs[m].msg_hdr.msg_control = g.control[m] if ctl else NULL
        g.msgs[m].msg_hdr.msg_controllen = ctl
        fds[m] = fds[i]
        m += 1
        i = j
    # sendmmsg in runs that share a socket (v4 / v6), keeping order
    run_start = 0
    for j in range(1, m + 1):
        if j == m or fds[j] != fds[run_start]:
            fd = fds[run_start]
            if fd < 0:
                _drop(L, D_NO_SOCKET, j - run_start)
            else:
                _send_run(L, fd, &g.msgs[run_start], &g.peer[run_start],
                          &g.pktinfo[run_start], j - run_start)
            run_start = j


cdef void _tx_loop(loop_t *L) noexcept nogil:
    cdef io_t *io = <io_t *>calloc(1, sizeof(io_t))
    cdef int i, n, j, fd, run_start, nsend
    cdef ssize_t r
    cdef uint8_t *slot
    cdef int32_t pid
    cdef peer_t *p
    cdef keypair_t *kp
    cdef double now
    cdef uint32_t sealed_len
    cdef int st
    cdef int fds[LOOP_BATCH]
    if io == NULL:
        return
    io.buf = <uint8_t *>malloc(LOOP_BATCH * SLOT_SIZE)
    if io.buf == NULL:
        free(io)
        return
    while not L.link_gone and _wait(L, L.tun_fd, -1) != 0:
        n = 0
        while n < LOOP_BATCH:
            slot = io.buf + n * SLOT_SIZE
            r = c_read(L.tun_fd, slot + HEADER_LEN, SLOT_SIZE - OVERHEAD - PAD_MULTIPLE)
            if r < 0 and errno != EAGAIN and errno != EINTR:
                # EBADFD/EIO: the link is gone; tell Python and stop reading
                L.link_gone = True
                _signal(L.slow_fd)
                break
            if r <= 0:
                break
            if r >= SLOT_SIZE - OVERHEAD - PAD_MULTIPLE:
                _drop(L, D_TOO_BIG, 1)     # maybe truncated: larger than a slot
                continue
            io.length[n] = <uint32_t>r
            n += 1
        if n == 0:
            continue
        now = _now()
        nsend = 0
        pthread_rwlock_rdlock(&L.lock)
        for i in range(n):
            slot = io.buf + i * SLOT_SIZE
            pid = _route(L, slot + HEADER_LEN, io.length[i], False)
            if pid == NO_PEER or pid >= L.npeers or not L.peers[pid].active:
                _drop(L, D_NO_ROUTE, 1)
                continue
            if _inner_length(slot + HEADER_LEN, io.length[i]) < 0:
                _drop(L, D_INVALID_PACKET, 1)
                continue
            p = &L.peers[pid]
            kp = p.current
            if (kp == NULL or p.ep_len == 0 or now - kp.created >= REJECT_AFTER_TIME
                    or KS_ATOMIC_LOAD64(&kp.send_counter) >= REJECT_AFTER_MESSAGES):
                # the core stages it and starts a handshake
                _slow_push(L, SK_PACKET, pid, slot + HEADER_LEN, io.length[i], NULL, 0)
                continue
            if ((KS_ATOMIC_LOAD64(&kp.send_counter) > REKEY_AFTER_MESSAGES
                    or (kp.is_initiator and now - kp.created > REKEY_AFTER_TIME))
                    and now >= p.next_attention):
                # one packet through the core lets it start the rekey (send.go keepKeyFresh)
                p.next_attention = now + ATTENTION_INTERVAL
                _slow_push(L, SK_PACKET, pid, slot + HEADER_LEN, io.length[i], NULL, 0)
                continue
            st = _seal_slot(kp, slot, io.length[i], L.mtu, SLOT_SIZE, &sealed_len)
            if st == ST_EXHAUSTED:
                _slow_push(L, SK_PACKET, pid, slot + HEADER_LEN, io.length[i], NULL, 0)
                continue
            if st != ST_OK:
                _drop(L, D_SEAL_FAILED if st == ST_SEAL_FAILED else D_TOO_BIG, 1)
                continue                       # never send a slot that was not sealed
            io.iov[nsend].iov_base = slot
            io.iov[nsend].iov_len = sealed_len
            pthread_mutex_lock(&p.ep_lock)
            memcpy(&io.addr[nsend], &p.ep, p.ep_len)
            io.msgs[nsend].msg_hdr.msg_namelen = p.ep_len
            memcpy(io.src[nsend], p.src, 16)
            io.src_len[nsend] = p.src_len
            io.src_ifindex[nsend] = p.src_ifindex
            pthread_mutex_unlock(&p.ep_lock)
            io.peer[nsend] = pid
            fds[nsend] = L.sock6 if io.addr[nsend].sin6_family == AF_INET6 else L.sock4
            io.msgs[nsend].msg_hdr.msg_name = &io.addr[nsend]
            io.msgs[nsend].msg_hdr.msg_iov = &io.iov[nsend]
            io.msgs[nsend].msg_hdr.msg_iovlen = 1
            io.msgs[nsend].msg_hdr.msg_control = NULL
            io.msgs[nsend].msg_hdr.msg_controllen = 0
            io.msgs[nsend].msg_hdr.msg_flags = 0
            p.tx_bytes += sealed_len
            p.last_tx_any = now
            p.last_tx_data = now
            KS_ATOMIC_OR(&p.flags, FL_ACTIVITY)
            nsend += 1
        pthread_rwlock_unlock(&L.lock)
        _send_all(L, io, fds, nsend)
        L.tx_packets += nsend
    OPENSSL_cleanse(io.buf, LOOP_BATCH * SLOT_SIZE)
    free(io.buf)
    free(io)


cdef inline bint _same_addr(const sockaddr_in6 *a, socklen_t alen, const sockaddr_in6 *b,
                            socklen_t blen) noexcept nogil:
    # family, port and address (v4: the 4 bytes after the port; v6: sin6_addr)
    cdef const uint8_t *x = <const uint8_t *>a
    cdef const uint8_t *y = <const uint8_t *>b
    cdef int k
    if alen != blen or a.sin6_family != b.sin6_family or a.sin6_port != b.sin6_port:
        return False
    if a.sin6_family == AF_INET:
        for k in range(4, 8):
            if x[k] != y[k]:
                return False
        return True
    for k in range(16):
        if a.sin6_addr.s6_addr[k] != b.sin6_addr.s6_addr[k]:
            return False
    return a.sin6_scope_id == b.sin6_scope_id




cdef struct rx_t:
    uint8_t *buf                     # RX_MSGS * RX_BUF
    sockaddr_in6 addr[RX_MSGS]
    iovec iov[RX_MSGS]
    mmsghdr msgs[RX_MSGS]
    uint8_t control[RX_MSGS][RX_CONTROL]
    uint32_t gso[RX_MSGS]            # segment size (0: not coalesced)
    uint8_t local[RX_MSGS][16]       # our address the datagram was sent to
    uint8_t local_len[RX_MSGS]
    uint32_t local_ifindex[RX_MSGS]
    uint8_t *wptr[RX_SEGS]           # decrypted packets waiting for the TUN write
    uint32_t wlen[RX_SEGS]


cdef int _recv_batch(loop_t *L, rx_t *rx, int fd, int start) noexcept nogil:
    cdef int i, r
    cdef cmsghdr *c
    cdef uint8_t *d
    for i in range(start, RX_MSGS):
        rx.iov[i].iov_base = rx.buf + i * RX_BUF
        rx.iov[i].iov_len = RX_BUF
        rx.msgs[i].msg_hdr.msg_name = &rx.addr[i]
        rx.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
        rx.msgs[i].msg_hdr.msg_iov = &rx.iov[i]
        rx.msgs[i].msg_hdr.msg_iovlen = 1
        rx.msgs[i].msg_hdr.msg_control = rx.control[i]
        rx.msgs[i].msg_hdr.msg_controllen = RX_CONTROL
        rx.msgs[i].msg_hdr.msg_flags = 0
    r = recvmmsg(fd, &rx.msgs[start], RX_MSGS - start, MSG_DONTWAIT, NULL)
    if r <= 0:
        return start
    for i in range(start, start + r):
        rx.gso[i] = 0
        rx.local_len[i] = 0
        rx.local_ifindex[i] = 0
        c = CMSG_FIRSTHDR(&rx.msgs[i].msg_hdr)
        while c != NULL:
            d = CMSG_DATA(c)
            if c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_GRO:
                rx.gso[i] = (<int *>d)[0]
            elif c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_PKTINFO and c.cmsg_len >= CMSG_LEN(12):
                memcpy(rx.local[i], d + 4, 4)          # in_pktinfo.ipi_spec_dst
                rx.local_len[i] = 4
            elif c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_PKTINFO and c.cmsg_len >= CMSG_LEN(20):
                memcpy(rx.local[i], d, 16)             # in6_pktinfo.ipi6_addr
                rx.local_len[i] = 16
                if d[0] == 0xFE and (d[1] & 0xC0) == 0x80:   # link-local needs its link
                    memcpy(&rx.local_ifindex[i], d + 16, 4)
            c = CMSG_NXTHDR(&rx.msgs[i].msg_hdr, c)
    return start + r


cdef inline int _rx_one(loop_t *L, rx_t *rx, int m, uint8_t *slot, uint32_t length,
                        double now, int nwrite) noexcept nogil:
    """One datagram (or one GRO segment) from message m; returns the new nwrite."""
    cdef keypair_t *kp
    cdef peer_t *p
    cdef int64_t inner
    cdef int32_t pid
    cdef socklen_t alen = rx.msgs[m].msg_hdr.msg_namelen
    cdef uint32_t kind, index
    cdef int want, st
    # C decides per datagram, as wireguard-go's socket reader: wrong sizes, unknown
    # types and unknown indices are dropped (and counted) here, never queued.
    if length < 4:
        _drop(L, D_INVALID_SIZE, 1)
        return nwrite
    kind = _get_le32(slot)
    if kind != MSG_TRANSPORT:
        want = _handshake_size(kind)
        if want < 0:
            _drop(L, D_INVALID_TYPE, 1)
        elif <uint32_t>want != length:
            _drop(L, D_INVALID_SIZE, 1)
        else:
            _hs_push(L, slot, length, &rx.addr[m], alen, rx.local[m], rx.local_len[m],
                     rx.local_ifindex[m])
        return nwrite
    if length < OVERHEAD:
        _drop(L, D_INVALID_SIZE, 1)
        return nwrite
    index = _get_le32(slot + 4)
    kp = _index_lookup(L, index)
    if kp == NULL:
        if _pending(L, index):
            # the core's not-yet-confirmed session (Python pushed its index): it decides
            _slow_push(L, SK_DATAGRAM, NO_PEER, slot, length, &rx.addr[m], alen,
                       rx.local[m], rx.local_len[m], rx.local_ifindex[m])
        else:
            _drop(L, D_UNKNOWN_INDEX, 1)
        return nwrite
    if kp.created + REJECT_AFTER_TIME < now:
        _drop(L, D_EXPIRED, 1)
        return nwrite
    st = _open_slot(kp, slot, length)     # THE open (open_batch uses it too)
    if st != ST_OK:
        _drop(L, D_REPLAY if st == ST_REPLAY else D_DECRYPT if st == ST_BAD_TAG
              else D_INVALID_SIZE, 1)
        return nwrite
    # authenticated from here on
    p = &L.peers[kp.peer]
    if not _same_addr(&p.ep, p.ep_len, &rx.addr[m], alen):
        pthread_mutex_lock(&p.ep_lock)
        memcpy(&p.ep, &rx.addr[m], alen)
        p.ep_len = alen
        pthread_mutex_unlock(&p.ep_lock)
        KS_ATOMIC_OR(&p.flags, FL_ENDPOINT)
    if (rx.local_len[m] != p.src_len or rx.local_ifindex[m] != p.src_ifindex
            or memcmp(rx.local[m], p.src, rx.local_len[m]) != 0):
        pthread_mutex_lock(&p.ep_lock)
        memcpy(p.src, rx.local[m], 16)
        p.src_len = rx.local_len[m]
        p.src_ifindex = rx.local_ifindex[m]
        pthread_mutex_unlock(&p.ep_lock)
    p.rx_bytes += length
    p.last_rx_any = now
    if (kp.is_initiator and p.current == kp
            and now - kp.created > REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT):
        KS_ATOMIC_OR(&p.flags, FL_REKEY_RX)
    KS_ATOMIC_OR(&p.flags, FL_ACTIVITY)
    if length == OVERHEAD:
        return nwrite                     # keepalive
    p.last_rx_data = now
    inner = _inner_length(slot + HEADER_LEN, length - OVERHEAD)
    if inner < 0:
        _drop(L, D_INVALID_INNER, 1)
        return nwrite
    pid = _route(L, slot + HEADER_LEN, <uint32_t>inner, True)
    if pid != kp.peer:
        _drop(L, D_SOURCE, 1)
        return nwrite
    rx.wptr[nwrite] = slot + HEADER_LEN
    rx.wlen[nwrite] = <uint32_t>inner
    return nwrite + 1


cdef void _flush_tun(loop_t *L, rx_t *rx, int nwrite) noexcept nogil:
    cdef int i
    for i in range(nwrite):
        if c_write(L.tun_fd, rx.wptr[i], rx.wlen[i]) < 0:
            _drop(L, D_TUN_WRITE, 1)
    KS_ATOMIC_ADD64(&L.rx_packets, nwrite)


cdef void _rx_loop(loop_t *L) noexcept nogil:
    cdef rx_t *rx = <rx_t *>calloc(1, sizeof(rx_t))
    cdef int i, n, n4, ready, one = 1, nwrite
    cdef uint32_t off, seg, total
    cdef double now
    if rx == NULL:
        return
    rx.buf = <uint8_t *>malloc(RX_MSGS * RX_BUF)
    if rx.buf == NULL:
        free(rx)
        return
    # UDP GRO: the kernel hands over runs of same-size datagrams from one sender as
    # one buffer (split again below); old kernels refuse and nothing changes.
    if L.sock4 >= 0:
        setsockopt(L.sock4, SOL_UDP, UDP_GRO, &one, sizeof(int))
    if L.sock6 >= 0:
        setsockopt(L.sock6, SOL_UDP, UDP_GRO, &one, sizeof(int))
    while True:
        ready = _wait(L, L.sock4, L.sock6)
        if ready == 0:
            break
        n4 = _recv_batch(L, rx, L.sock4, 0) if ready & 1 else 0
        n = _recv_batch(L, rx, L.sock6, n4) if ready & 2 else n4
        if n == 0:
            continue
        now = _now()
        nwrite = 0
        pthread_rwlock_rdlock(&L.lock)
        for i in range(n):
            if rx.msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                _drop(L, D_TRUNCATED, 1)   # longer than the buffer: not all of it is here
                continue
            total = rx.msgs[i].msg_len
            seg = rx.gso[i] if rx.gso[i] else total
            if seg == 0:
                seg = 1     # an empty datagram: handled (dropped) as one segment
            off = 0
            while off < total or (total == 0 and off == 0):
                if nwrite >= RX_SEGS:
                    # a GRO batch of any size: write out what is ready, go on
                    _flush_tun(L, rx, nwrite)
                    nwrite = 0
                nwrite = _rx_one(L, rx, i, rx.buf + i * RX_BUF + off,
                                 seg if total - off > seg else total - off, now, nwrite)
                off += seg
        pthread_rwlock_unlock(&L.lock)
        _flush_tun(L, rx, nwrite)
    OPENSSL_cleanse(rx.buf, RX_MSGS * RX_BUF)
    free(rx.buf)
    free(rx)


import socket as _socket
import threading as _threading


cdef bytes _sockaddr_bytes(object endpoint):
    """(ip, port) -> a raw sockaddr_in / sockaddr_in6, as the kernel wants it."""
    ip, port = endpoint
    if not 0 < port < 65536:
        raise ValueError("bad port")
    host, _, zone = str(ip).partition("%")
    if ":" in host:
        scope = _socket.if_nametoindex(zone) if zone and not zone.isdigit() else int(zone or 0)
        return (AF_INET6.to_bytes(2, "little") + port.to_bytes(2, "big") + bytes(4)
                + _socket.inet_pton(_socket.AF_INET6, host) + scope.to_bytes(4, "little"))
    return (AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big")
            + _socket.inet_pton(_socket.AF_INET, host) + bytes(8))


cdef object _sockaddr_tuple(const sockaddr_in6 *a, socklen_t n):
    cdef const uint8_t *b = <const uint8_t *>a
    if n == 0:
        return None
    port = (b[2] << 8) | b[3]
    if a.sin6_family == AF_INET and n >= 8:
        return (_socket.inet_ntop(_socket.AF_INET, bytes(b[4:8])), port)
    if a.sin6_family == AF_INET6 and n >= 24:
        ip = _socket.inet_ntop(_socket.AF_INET6, bytes(b[8:24]))
        mapped = ip.startswith("::ffff:") and "." in ip
        if mapped:
            ip = ip[7:]
        if a.sin6_scope_id and not mapped:
            ip = f"{ip}%{a.sin6_scope_id}"
        return (ip, port)
    return None


cdef class PacketLoop:
    """The C data path for one interface: TUN fd and the v4/v6 UDP sockets' fds.

    Python (``kubespan_dp.fastloop``) tells it who the peers are (``add_peer``),
    where they are (``set_endpoint``), what they route (``set_allowed_ips``) and
    which keypairs to use (``set_keypairs``); it reads back what happened
    (``peer_stats``, ``take_slow``, ``drops``).  The fds stay owned by the caller.
    """
    cdef loop_t *L
    cdef object _threads
    cdef dict _keypairs              # peer id -> (current, previous) kept alive here
    cdef readonly int max_peers

    def __cinit__(self, int tun_fd, int sock4_fd, int sock6_fd, int mtu=1420,
                  int max_peers=65536):
        cdef pthread_rwlockattr_t attr
        cdef int i
        if mtu < 0 or mtu > 65535:
            raise ValueError("mtu must be 0..65535")
        if max_peers < 1 or max_peers > 1 << 20:
            raise ValueError("max_peers out of range")
        self.max_peers = max_peers
        self._keypairs = {}
        self._threads = []
        self.L = <loop_t *>calloc(1, sizeof(loop_t))
        if self.L == NULL:
            raise MemoryError()
        self.L.tun_fd, self.L.sock4, self.L.sock6, self.L.mtu = tun_fd, sock4_fd, sock6_fd, mtu
        self.L.stop_fd = self.L.slow_fd = -1
        self.L.root4 = self.L.root6 = -1
        self.L.peers = <peer_t *>calloc(max_peers, sizeof(peer_t))
        self.L.slow = <slow_t *>calloc(SLOW_CAP, sizeof(slow_t))
        self.L.hs = <hs_t *>calloc(HS_CAP, sizeof(hs_t))
        if self.L.peers == NULL or self.L.slow == NULL or self.L.hs == NULL:
            raise MemoryError()
        for i in range(max_peers):
            pthread_mutex_init(&self.L.peers[i].ep_lock, NULL)
        pthread_mutex_init(&self.L.slow_lock, NULL)
        pthread_mutex_init(&self.L.hs_lock, NULL)
        pthread_rwlockattr_init(&attr)
        # Python's updates must not starve behind two busy reader threads.
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        pthread_rwlock_init(&self.L.lock, &attr)
        self.L.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.L.slow_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.L.stop_fd < 0 or self.L.slow_fd < 0:
            raise OSError("eventfd failed")

    def __dealloc__(self):
        cdef int i
        if self.L == NULL:
            return
        # threads hold a reference to self while running, so none is alive here
        if self.L.stop_fd >= 0:
            c_close(self.L.stop_fd)
        if self.L.slow_fd >= 0:
            c_close(self.L.slow_fd)
        if self.L.peers != NULL:
            for i in range(self.max_peers):
                pthread_mutex_destroy(&self.L.peers[i].ep_lock)
            OPENSSL_cleanse(self.L.peers, self.max_peers * sizeof(peer_t))
        if self.L.slow != NULL:
            OPENSSL_cleanse(self.L.slow, SLOW_CAP * sizeof(slow_t))
        pthread_rwlock_destroy(&self.L.lock)
        pthread_mutex_destroy(&self.L.slow_lock)
        pthread_mutex_destroy(&self.L.hs_lock)
        free(self.L.hs)
        free(self.L.pend_keys)
        free(self.L.peers)
        free(self.L.slow)
        free(self.L.ix_keys)
        free(self.L.ix_vals)
        free(self.L.nodes)
        free(self.L)

    # -- threads ---------------------------------------------------------------

    def _run_tx(self):
        with nogil:
            _tx_loop(self.L)

    def _run_rx(self):
        with nogil:
            _rx_loop(self.L)

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        if self._threads:
            return
        self.L.stopping = False
        self.L.link_gone = False
        self._threads = [_threading.Thread(target=self._run_tx, name="ks-fast-tx", daemon=True),
                         _threading.Thread(target=self._run_rx, name="ks-fast-rx", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        cdef uint64_t junk
        if not self._threads:
            return
        self.L.stopping = True
        _signal(self.L.stop_fd)
        for t in self._threads:
            t.join()
        self._threads = []
        c_read(self.L.stop_fd, &junk, 8)

    def set_mtu(self, int mtu) -> None:
        """Padding is capped at the link MTU; follow it when it changes.  Packets
        longer than a slot (9152 bytes) are dropped and counted as "too_big"."""
        if mtu < 0 or mtu > 65535:
            raise ValueError("mtu must be 0..65535")
        self.L.mtu = mtu

    def rebind(self, int sock4_fd, int sock6_fd) -> None:
        """Use other UDP sockets (listen port or fwmark changed)."""
        was = bool(self._threads)
        self.stop()
        self.L.sock4, self.L.sock6 = sock4_fd, sock6_fd
        if was:
            self.start()

    # -- peers -----------------------------------------------------------------

    cdef peer_t *_peer(self, int pid) except NULL:
        if pid < 0 or pid >= self.max_peers:
            raise ValueError(f"peer id {pid} out of range")
        return &self.L.peers[pid]

    def add_peer(self, int pid) -> None:
        """Make slot ``pid`` a live peer with no endpoint, keys or routes yet."""
        cdef peer_t *p = self._peer(pid)
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
        p.active = True
        p.current = p.previous = NULL
        p.ep_len = 0
        p.tx_bytes = p.rx_bytes = 0
        p.last_tx_any = p.last_tx_data = p.last_rx_any = p.last_rx_data = 0
        p.next_attention = 0
        p.flags = 0
        if pid >= self.L.npeers:
            self.L.npeers = pid + 1
        pthread_rwlock_unlock(&self.L.lock)

    def remove_peer(self, int pid) -> None:
        """Forget a peer; its keypairs leave the index table, its routes must be
        removed with ``set_allowed_ips`` (until then they lead nowhere)."""
        cdef peer_t *p = self._peer(pid)
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
        try:
            p.active = False
            p.current = p.previous = NULL
            p.ep_len = 0
            self._rebuild_index_locked()
        finally:
            pthread_rwlock_unlock(&self.L.lock)
        self._keypairs.pop(pid, None)

    def set_endpoint(self, int pid, object endpoint) -> None:
        """``(ip, port)`` or None."""
        cdef peer_t *p = self._peer(pid)
        cdef bytes raw = _sockaddr_bytes(endpoint) if endpoint is not None else b""
        with nogil:
            pthread_mutex_lock(&p.ep_lock)
        p.ep_len = len(raw)
        p.src_len = 0          # the address we answered from belonged to the old one
        if raw:
            memcpy(&p.ep, <const char *>raw, len(raw))
        pthread_mutex_unlock(&p.ep_lock)

    def set_source(self, int pid, object local) -> None:
        """The local address to send to this peer from: (packed 4/16 bytes, ifindex)
        or None for the kernel's choice.  Received packets update it on their own."""
        cdef peer_t *p = self._peer(pid)
        cdef bytes addr = b""
        cdef uint32_t ifindex = 0
        if local is not None:
            addr, ifindex = bytes(local[0]), local[1]
            if len(addr) not in (4, 16):
                raise ValueError("local address must be 4 or 16 bytes")
        with nogil:
            pthread_mutex_lock(&p.ep_lock)
        p.src_len = len(addr)
        p.src_ifindex = ifindex
        if addr:
            memcpy(p.src, <const char *>addr, len(addr))
        pthread_mutex_unlock(&p.ep_lock)

    def get_endpoint(self, int pid):
        cdef peer_t *p = self._peer(pid)
        cdef sockaddr_in6 ep
        cdef socklen_t n
        with nogil:
            pthread_mutex_lock(&p.ep_lock)
            memcpy(&ep, &p.ep, sizeof(sockaddr_in6))
            n = p.ep_len
            pthread_mutex_unlock(&p.ep_lock)
        return _sockaddr_tuple(&ep, n)

    def set_keypairs(self, int pid, Keypair current, Keypair previous) -> None:
        """The keypairs the core has confirmed for this peer (either may be None).

        Sending uses ``current``; receiving accepts both.  The core's unconfirmed
        ``next`` keypair stays with the core until its first packet promotes it.
        """
        cdef peer_t *p = self._peer(pid)
        if not p.active:
            raise ValueError(f"peer {pid} is not active")
        for kp in (current, previous):
            if kp is not None:
                for other, pair in self._keypairs.items():
                    if other != pid and kp in pair:
                        raise ValueError("keypair already belongs to another peer")
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
        p.current = current.kp if current is not None else NULL
        p.previous = previous.kp if previous is not None else NULL
        if current is not None:
            current.kp.peer = pid
        if previous is not None:
            previous.kp.peer = pid
        try:
            self._rebuild_index_locked()
        finally:
            pthread_rwlock_unlock(&self.L.lock)
        self._keypairs[pid] = (current, previous)

    cdef int _rebuild_index_locked(self) except -1:
        cdef int i, count = 0, cap = 16
        cdef keypair_t *k
        cdef keypair_t *slots[2]
        cdef uint32_t j, mask
        cdef uint32_t *keys
        cdef keypair_t **vals
        for i in range(self.L.npeers):
            if self.L.peers[i].active:
                count += (self.L.peers[i].current != NULL) + (self.L.peers[i].previous != NULL)
        while cap < 2 * count + 2:
            cap *= 2
        keys = <uint32_t *>calloc(cap, sizeof(uint32_t))
        vals = <keypair_t **>calloc(cap, sizeof(keypair_t *))
        if keys == NULL or vals == NULL:
            free(keys)
            free(vals)
            raise MemoryError()
        mask = cap - 1
        for i in range(self.L.npeers):
            if not self.L.peers[i].active:
                continue
            slots[0], slots[1] = self.L.peers[i].current, self.L.peers[i].previous
            for k in slots[:2]:
                if k == NULL:
                    continue
                j = (k.local_index * 2654435761u) & mask
                while vals[j] != NULL and vals[j] != k:
                    j = (j + 1) & mask
                keys[j] = k.local_index
                vals[j] = k
        free(self.L.ix_keys)
        free(self.L.ix_vals)
        self.L.ix_keys, self.L.ix_vals, self.L.ix_cap = keys, vals, cap
        return 0

    def set_allowed_ips(self, entries) -> None:
        """Replace the routing table: iterable of (packed network address, prefix
        length, peer id).  Later entries win on an identical prefix."""
        cdef list items = []
        cdef int total = 2, bits, pid, i, b
        cdef bytes addr
        for raw, plen, pid in entries:
            addr = bytes(raw)
            bits = len(addr) * 8
            if bits not in (32, 128) or not 0 <= plen <= bits:
                raise ValueError(f"bad prefix length {plen} for a {len(addr)}-byte address")
            if pid < 0 or pid >= self.max_peers:
                raise ValueError(f"peer id {pid} out of range")
            items.append((addr, plen, pid))
            total += plen
        cdef trie_node_t *nodes = <trie_node_t *>malloc(total * sizeof(trie_node_t))
        cdef int n = 2
        cdef int32_t node
        cdef const uint8_t *a
        if nodes == NULL:
            raise MemoryError()
        for i in range(2):
            nodes[i].child[0] = nodes[i].child[1] = -1
            nodes[i].peer = NO_PEER
        for addr, plen, pid in items:
            a = addr
            node = 0 if len(addr) == 4 else 1
            for i in range(plen):
                b = (a[i >> 3] >> (7 - (i & 7))) & 1
                if nodes[node].child[b] < 0:
                    nodes[n].child[0] = nodes[n].child[1] = -1
                    nodes[n].peer = NO_PEER
                    nodes[node].child[b] = n
                    n += 1
                node = nodes[node].child[b]
            nodes[node].peer = pid
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
        free(self.L.nodes)
        self.L.nodes, self.L.nnodes, self.L.root4, self.L.root6 = nodes, n, 0, 1
        pthread_rwlock_unlock(&self.L.lock)

    def route(self, const uint8_t[::1] packet, bint source=False) -> int:
        """Which peer the packet's destination (or source) belongs to; -1 if none."""
        cdef int32_t r
        if self.L.nodes == NULL or packet.shape[0] == 0:
            return NO_PEER
        with nogil:
            pthread_rwlock_rdlock(&self.L.lock)
            r = _route(self.L, &packet[0], packet.shape[0], source)
            pthread_rwlock_unlock(&self.L.lock)
        return r

    def replay_check(self, Keypair kp not None, uint64_t counter) -> bool:
        """Would ``kp``'s receive window accept ``counter``?  For the core opening
        data on a keypair C owns: under the write lock, as the receiving thread
        changes the windows of installed keypairs."""
        cdef keypair_t *k = kp.kp
        cdef bint ok
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            ok = _replay_check(&k.replay, counter)
            pthread_rwlock_unlock(&self.L.lock)
        return ok

    def replay_update(self, Keypair kp not None, uint64_t counter) -> bool:
        """Record ``counter`` (authenticated by the core) in ``kp``'s receive window;
        False if it was accepted before or is too old: then it must be dropped."""
        cdef keypair_t *k = kp.kp
        cdef bint ok
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
            ok = _replay_update(&k.replay, counter)
            pthread_rwlock_unlock(&self.L.lock)
        return ok

    # -- what happened ---------------------------------------------------------

    def peer_stats(self, int pid) -> tuple:
        """(tx_bytes, rx_bytes, last_tx_any, last_tx_data, last_rx_any, last_rx_data,
        flags); reading clears the flags."""
        cdef peer_t *p = self._peer(pid)
        flags = KS_ATOMIC_XCHG(&p.flags, 0)
        return (p.tx_bytes, p.rx_bytes, p.last_tx_any, p.last_tx_data, p.last_rx_any,
                p.last_rx_data, flags)

    @property
    def slow_fd(self) -> int:
        """Readable (eventfd) when ``take_slow()`` has work."""
        return self.L.slow_fd

    def take_slow(self, int limit=SLOW_CAP) -> list:
        """Up to ``limit`` queued items: (kind, bytes, (ip, port) | None, peer id,
        (packed local address, ifindex) | None)."""
        cdef uint64_t junk
        cdef slow_t *e
        cdef list out = []
        c_read(self.L.slow_fd, &junk, 8)
        while len(out) < limit:
            with nogil:
                pthread_mutex_lock(&self.L.slow_lock)
            if self.L.slow_count == 0:
                pthread_mutex_unlock(&self.L.slow_lock)
                break
            try:
                e = &self.L.slow[self.L.slow_head]
                local = (PyBytes_FromStringAndSize(<char *>e.local, e.local_len),
                         e.local_ifindex) if e.local_len else None
                item = (e.kind, PyBytes_FromStringAndSize(<char *>e.data, e.length),
                        _sockaddr_tuple(&e.addr, e.addrlen), e.peer, local)
            finally:
                # consumed even if building it failed: a bad item cannot wedge the queue
                self.L.slow_head = (self.L.slow_head + 1) % SLOW_CAP
                self.L.slow_count -= 1
                pthread_mutex_unlock(&self.L.slow_lock)
            out.append(item)
        if self.L.slow_count or self.L.hs_count:
            _signal(self.L.slow_fd)   # more left: wake the caller again
        return out

    def take_handshakes(self, int limit=HS_CAP) -> list:
        """Up to ``limit`` queued handshake messages (types 1-3, each of its one
        valid size): (bytes, (ip, port) | None, (packed local address, ifindex) | None).
        Does not consume the wakeup: call after ``take_slow``."""
        cdef hs_t *e
        cdef list out = []
        while len(out) < limit:
            with nogil:
                pthread_mutex_lock(&self.L.hs_lock)
            if self.L.hs_count == 0:
                pthread_mutex_unlock(&self.L.hs_lock)
                break
            try:
                e = &self.L.hs[self.L.hs_head]
                local = (PyBytes_FromStringAndSize(<char *>e.local, e.local_len),
                         e.local_ifindex) if e.local_len else None
                item = (PyBytes_FromStringAndSize(<char *>e.data, e.length),
                        _sockaddr_tuple(&e.addr, e.addrlen), local)
            finally:
                self.L.hs_head = (self.L.hs_head + 1) % HS_CAP
                self.L.hs_count -= 1
                pthread_mutex_unlock(&self.L.hs_lock)
            out.append(item)
        if self.L.hs_count:
            _signal(self.L.slow_fd)
        return out

    @property
    def handshake_backlog(self) -> int:
        """Handshake messages waiting in C (the "under load" signal is taken on it)."""
        return self.L.hs_count

    @property
    def handshake_capacity(self) -> int:
        return HS_CAP

    def set_pending(self, indices) -> None:
        """Our indices of sessions the core runs and C does not: data addressed to
        them goes to the slow queue; data to any other unknown index is dropped."""
        cdef list idx = [int(i) for i in indices]
        cdef int cap = 16, n = len(idx)
        cdef uint64_t *keys
        cdef uint32_t j, mask, v
        for v in idx:          # range-checks each (uint32)
            pass
        while cap < 2 * n + 2:
            cap *= 2
        keys = <uint64_t *>calloc(cap, sizeof(uint64_t))
        if keys == NULL:
            raise MemoryError()
        mask = cap - 1
        for v in idx:
            j = (v * 2654435761u) & mask
            while keys[j] != 0 and keys[j] != <uint64_t>v + 1:
                j = (j + 1) & mask
            keys[j] = <uint64_t>v + 1
        with nogil:
            pthread_rwlock_wrlock(&self.L.lock)
        free(self.L.pend_keys)
        self.L.pend_keys, self.L.pend_cap = keys, cap
        pthread_rwlock_unlock(&self.L.lock)

    def drops(self) -> dict:
        cdef int i
        cdef dict out = {}
        for i in range(D_COUNT):
            n = KS_ATOMIC_LOAD64(&self.L.drops[i])
            if n:
                out[DROP_REASONS[i]] = n
        return out

    @property
    def link_gone(self) -> bool:
        """The TUN device failed for good (deleted); the sending thread stopped."""
        return self.L.link_gone

    @property
    def tx_packets(self) -> int:
        return self.L.tx_packets

    @property
    def rx_packets(self) -> int:
        return self.L.rx_packets
