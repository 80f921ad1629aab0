# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The C packet path: WireGuard transport on OpenSSL EVP with the GIL released.

This module is the product: ``Keypair`` (one session's keys, send counter and replay
window, all in C) and ``PacketLoop`` (the TUN <-> UDP threads, see the section header
below) with the methods Python drives it through.  The C underneath is split by
concern into inline-only .pxd files compiled into this module:

- ``_wg_defs``: wire constants (read from ``_wg_constants.h``, which setup.py generates
  from ``kubespan_dp/constants.py``), slot statuses, atomics;
- ``_wg_crypto``: ChaCha20-Poly1305 on EVP, THE seal/open of one payload;
- ``_wg_replay``: the RFC 6479 replay window;
- ``_wg_tables``: the allowed-IPs trie and the index tables;
- ``_wg_keypair``: ``keypair_t`` and THE seal/open of a transport message in a slot
  (in steps, so the cipher can run on several threads);
- ``_wg_os``: the libc / Linux declarations (sockets, cmsg, poll, eventfd, pthread);
- ``_wg_ring``: the bounded queue (the slow queue and the handshake queue);
- ``_wg_loop``: ``loop_t``, the state the threads and Python share, drops, routing;
- ``_wg_io``: batched I/O (recvmmsg + GRO, sendmmsg + GSO, sticky source, TUN writes);
- ``_wg_offload``: TUN offloads (virtio header, TSO/USO segmentation, GRO coalescing);
- ``_wg_crew``: crypto lanes, helper threads that share a batch's cipher work.

Test and benchmark helpers (``PacketBatch``, the batch seal/open, ``AEADKey``, the
EVP baseline) live in ``kubespan_dp._batch``, built from the same .pxd files.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset
from posix.unistd cimport close as c_close, read as c_read, write as c_write

from kubespan_dp._wg_defs cimport *
from kubespan_dp._wg_crypto cimport *
from kubespan_dp._wg_replay cimport *
from kubespan_dp._wg_tables cimport *
from kubespan_dp._wg_keypair cimport *
from kubespan_dp._wg_os cimport *
from kubespan_dp._wg_ring cimport *
from kubespan_dp._wg_crew cimport *
from kubespan_dp._wg_loop cimport *
from kubespan_dp._wg_io cimport *

import os as _os
import socket as _socket
import threading as _threading


# ---------------------------------------------------------------------------
# Small C helpers

def _lanes_from_env() -> int:
    """Crypto lanes per loop direction: the CPUs this process may run on, at most
    CRYPTO_LANES; KUBESPAN_WG_CRYPTO_LANES=N overrides (1: the loop threads alone)."""
    raw = _os.environ.get("KUBESPAN_WG_CRYPTO_LANES", "")
    n = int(raw) if raw.strip().isdigit() else len(_os.sched_getaffinity(0))
    return max(1, min(n, CRYPTO_LANES))


# fixed at import: every Keypair gets one EVP context pair per lane the loop uses
cdef int _LANES = _lanes_from_env()


def crypto_lanes() -> int:
    """Threads that run the cipher for each direction of a PacketLoop (the loop
    thread and crypto_lanes() - 1 helpers)."""
    return _LANES


cdef bytes _key32(object key, str what):
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise ValueError(f"{what} must be 32 bytes")
    return bytes(key)


# ---------------------------------------------------------------------------
# 1. Keypair: one session's keys, counter and replay window in C

cdef class Keypair:
    """Both directions of one WireGuard session, ready for the C packet path.

    The send counter and the replay window live here in C.  Once the Python core
    hands a session over (fastloop), they are the session's only ones: what the core
    still seals on it takes ``reserve_counter()``, what it still opens goes through
    ``PacketLoop.replay_check`` / ``replay_update``.
    """
    # cdef keypair_t *kp: declared in _fastpath.pxd (kubespan_dp._batch uses it)

    def __cinit__(self, send_key, receive_key, uint32_t local_index,
                  uint32_t remote_index, *, bint is_initiator=False, double created=0.0,
                  uint64_t send_counter=0):
        cdef bytes sk = _key32(send_key, "send key")
        cdef bytes rk = _key32(receive_key, "receive key")
        self.kp = <keypair_t *>calloc(1, sizeof(keypair_t))
        if self.kp == NULL:
            raise MemoryError()
        cdef int lane
        for lane in range(_LANES):
            self.kp.seal_ctx[lane] = _new_ctx(<const uint8_t *>sk, 1)
            self.kp.open_ctx[lane] = _new_ctx(<const uint8_t *>rk, 0)
        self.kp.local_index = local_index
        self.kp.remote_index = remote_index
        self.kp.is_initiator = is_initiator
        self.kp.created = created
        self.kp.send_counter = send_counter

    def __dealloc__(self):
        cdef int lane
        if self.kp != NULL:
            for lane in range(CRYPTO_LANES):
                if self.kp.seal_ctx[lane] != NULL:
                    EVP_CIPHER_CTX_free(self.kp.seal_ctx[lane])
                if self.kp.open_ctx[lane] != NULL:
                    EVP_CIPHER_CTX_free(self.kp.open_ctx[lane])
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
# 2. PacketLoop: the data path between TUN and UDP, two C threads
#
# TX thread: poll TUN -> read a batch (with a virtio header: TSO/USO super-packets,
#   segmented into the slots) -> allowed-IPs lookup (destination) -> pick the peer's
#   current keypair -> counter, header, padding -> the batch's cipher in place (shared
#   with the crypto-lane helpers) -> sendmmsg to the peer's endpoint, runs of same-size
#   datagrams to one endpoint as one UDP GSO send, from the local address the peer
#   last wrote to (sticky source, IP_PKTINFO).
# RX thread: poll the UDP sockets -> recvmmsg a batch (UDP GRO on: one buffer may hold
#   many datagrams, split here) -> receiver-index lookup -> replay pre-check -> the
#   batch's cipher in place (shared with the helpers) -> in arrival order: replay
#   update -> roam the endpoint -> strip padding -> source must map to the same peer
#   -> write to TUN (with a virtio header: a flow's TCP segments, and UDP datagrams
#   with USO, coalesced into super-packets first).
#
# Both run with the GIL released for their whole life.  Anything they cannot finish
# (handshake and cookie messages, unknown indices, packets for a peer without a
# usable session, or one packet a second while a rekey is due) goes to the "slow
# queue" and an eventfd wakes Python, which feeds it to the sans-I/O core.  Python
# mirrors the core's keypairs, endpoints and allowed IPs into the loop under the
# write side of one rwlock; the threads hold the read side per batch.

cdef double ATTENTION_INTERVAL = 1.0   # at most one "rekey due" hand-off per peer per second

# The largest IP packet the C loop carries (a TUN read must leave room in a slot for
# the header, up to 15 bytes of padding and the tag); larger ones are "too_big".
MAX_PACKET = SLOT_SIZE - OVERHEAD - PAD_MULTIPLE - 1

# flags a peer collects for Python (read and cleared by Python)
FLAG_ACTIVITY = 1
FLAG_ENDPOINT = 2
FLAG_REKEY_RX = 4

# slow-queue kinds
SLOW_DATAGRAM = 1      # a UDP payload for the core (handshake, cookie, unknown index)
SLOW_PACKET = 2        # an IP packet from TUN for a peer without a usable session

# drop counters, by reason (index into loop_t.drops)
DROP_REASONS = ("no_route", "invalid_packet", "slow_queue_full", "udp_send_failed",
                "replay", "decrypt_failed", "keypair_expired", "invalid_inner_packet",
                "source_not_allowed", "tun_write_failed", "no_socket_for_family",
                "too_big", "seal_failed", "udp_truncated", "invalid_size",
                "invalid_type", "unknown_index", "handshake_queue_full", "offload_invalid")


cdef struct tx_stage_t:
    # a TUN read with its virtio header, split into slots over one or more batches
    uint8_t *buf                     # TUN_READ bytes
    size_t length                    # bytes read; 0: nothing pending
    size_t next                      # its next segment to split
    vnet_hdr_t h


cdef inline bint _tun_read_failed(loop_t *L, ssize_t r) noexcept nogil:
    # EBADFD/EIO: the link is gone; tell Python and stop reading
    if r < 0 and errno != EAGAIN and errno != EINTR:
        L.link_gone = True
        _signal(L.slow_fd)
        return True
    return False


cdef int _read_plain(loop_t *L, io_t *io) noexcept nogil:
    # Up to LOOP_BATCH packets from a plain TUN, one per slot (at HEADER_LEN).
    cdef int n = 0
    cdef ssize_t r
    cdef uint8_t *slot
    while n < LOOP_BATCH:
        slot = io.buf + n * SLOT_SIZE
        r = c_read(L.tun_fd, slot + HEADER_LEN, SLOT_SIZE - OVERHEAD - PAD_MULTIPLE)
        if r <= 0 or _tun_read_failed(L, r):
            break
        if r >= SLOT_SIZE - OVERHEAD - PAD_MULTIPLE:
            _drop(L, D_TOO_BIG, 1)     # maybe truncated: larger than a slot
            continue
        io.length[n] = <uint32_t>r
        n += 1
    return n


cdef int _read_vnet(loop_t *L, io_t *io, tx_stage_t *st) noexcept nogil:
    """Fill up to LOOP_BATCH slots from a TUN with a virtio header: each read (a
    TSO/USO super-packet of up to 64 KiB, or one packet) is segmented into MTU-sized
    IP packets (gso_split_part: sequence numbers, lengths, ids, checksums); a
    super-packet larger than the slots left continues in the next batch."""
    cdef int n = 0, k, total
    cdef ssize_t r
    while n < LOOP_BATCH:
        if st.length == 0:
            r = c_read(L.tun_fd, st.buf, TUN_READ)
            if r <= 0 or _tun_read_failed(L, r):
                break
            if r <= VIRTIO_NET_HDR_LEN:
                _drop(L, D_OFFLOAD, 1)
                continue
            vnet_parse(st.buf, &st.h)
            st.length = <size_t>r
            st.next = 0
        k = gso_split_part(&st.h, st.buf + VIRTIO_NET_HDR_LEN, st.length - VIRTIO_NET_HDR_LEN,
                           st.next, io.buf + n * SLOT_SIZE, SLOT_SIZE, HEADER_LEN,
                           SLOT_SIZE - OVERHEAD - PAD_MULTIPLE - 1, LOOP_BATCH - n,
                           &io.length[n], &total)
        if k < 0:
            _drop(L, D_TOO_BIG if k == OFL_E_TOO_BIG else D_OFFLOAD, 1)
            st.length = 0
            continue
        n += k
        st.next += k
        if st.next >= <size_t>total:
            st.length = 0
    return n


cdef void _tx_loop(loop_t *L) noexcept nogil:
    cdef io_t *io = <io_t *>calloc(1, sizeof(io_t))
    cdef tx_stage_t st
    cdef int i, n, j, fd, run_start, nsend
    cdef uint8_t *slot
    cdef int32_t pid
    cdef peer_t *p
    cdef keypair_t *kp
    cdef double now
    cdef uint32_t sealed_len
    cdef int st_, nitems
    cdef size_t nbytes
    cdef int fds[LOOP_BATCH]
    if io == NULL:
        return
    memset(&st, 0, sizeof(st))
    io.buf = <uint8_t *>malloc(LOOP_BATCH * SLOT_SIZE)
    if L.vnet_hdr:
        st.buf = <uint8_t *>malloc(TUN_READ)
    if io.buf == NULL or (L.vnet_hdr and st.buf == NULL):
        free(io.buf)
        free(st.buf)
        free(io)
        return
    # (a super-packet still being split needs no wait)
    while not L.link_gone and not L.stopping and (st.length or _wait(L, L.tun_fd, -1) != 0):
        n = _read_vnet(L, io, &st) if L.vnet_hdr else _read_plain(L, io)
        if n == 0:
            continue
        now = _now()
        nsend = 0
        nitems = 0
        nbytes = 0
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
            # THE seal, step 1 (counter, header, padding); the cipher runs below
            st_ = _seal_prepare(kp, slot, io.length[i], L.mtu, SLOT_SIZE, &sealed_len)
            if st_ == ST_EXHAUSTED:
                _slow_push(L, SK_PACKET, pid, slot + HEADER_LEN, io.length[i], NULL, 0)
                continue
            if st_ != ST_OK:
                _drop(L, D_TOO_BIG, 1)
                continue
            io.items[nitems].kp = kp
            io.items[nitems].slot = slot
            io.items[nitems].length = sealed_len
            io.peer[nitems] = pid
            nitems += 1
            nbytes += sealed_len
        # the cipher for the whole batch, on every lane
        _crew_run(&L.crew_tx, CREW_SEAL, io.items, nitems, nbytes)
        for j in range(nitems):
            if io.items[j].status != ST_OK:
                _drop(L, D_SEAL_FAILED, 1)
                continue                       # never send a slot that was not sealed
            pid = io.peer[j]                   # (j >= nsend: not overwritten yet)
            p = &L.peers[pid]
            sealed_len = io.items[j].length
            io.iov[nsend].iov_base = io.items[j].slot
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
    if st.buf != NULL:
        OPENSSL_cleanse(st.buf, TUN_READ)
    free(st.buf)
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


cdef inline void _rx_check(loop_t *L, rx_t *rx, int m, uint8_t *slot, uint32_t length,
                           double now) noexcept nogil:
    """Receive, step 1: one datagram (or one GRO segment) from message m.  A transport
    message for a known keypair whose counter is new joins the round's items (for
    the cipher); anything else is queued for Python or dropped here."""
    cdef keypair_t *kp
    cdef socklen_t alen = rx.msgs[m].msg_hdr.msg_namelen
    cdef uint32_t kind, index
    cdef int want, st
    cdef crew_item_t *it
    # C decides per datagram, as wireguard-go's socket reader: wrong sizes, unknown
    # types and unknown indices are dropped (and counted) here, never queued.
    if length < 4:
        _drop(L, D_INVALID_SIZE, 1)
        return
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
        return
    if length < OVERHEAD:
        _drop(L, D_INVALID_SIZE, 1)
        return
    index = _get_le32(slot + 4)
    kp = _index_lookup(L, index)
    if kp == NULL:
        if _pending(L, index):
            # the core's not-yet-confirmed session (Python pushed its index): it decides
            _slow_push(L, SK_DATAGRAM, NO_PEER, slot, length, &rx.addr[m], alen,
                       rx.local[m], rx.local_len[m], rx.local_ifindex[m])
        else:
            _drop(L, D_UNKNOWN_INDEX, 1)
        return
    if kp.created + REJECT_AFTER_TIME < now:
        _drop(L, D_EXPIRED, 1)
        return
    st = _open_check(kp, slot, length)    # THE open, step 1 (open_batch: _open_slot)
    if st != ST_OK:
        _drop(L, D_REPLAY if st == ST_REPLAY else D_INVALID_SIZE, 1)
        return
    it = &rx.items[rx.nitems]
    it.kp = kp
    it.slot = slot
    it.length = length
    rx.item_msg[rx.nitems] = m
    rx.nitems += 1
    rx.item_bytes += length


cdef inline int _rx_deliver(loop_t *L, rx_t *rx, int j, double now, int nwrite) noexcept nogil:
    """Receive, step 3 (after the cipher, in arrival order): item j's replay window,
    endpoint, counters and inner packet; returns the new nwrite."""
    cdef crew_item_t *it = &rx.items[j]
    cdef keypair_t *kp = it.kp
    cdef uint8_t *slot = it.slot
    cdef uint32_t length = it.length
    cdef int m = rx.item_msg[j]
    cdef socklen_t alen = rx.msgs[m].msg_hdr.msg_namelen
    cdef peer_t *p
    cdef int64_t inner
    cdef int32_t pid
    if it.status != ST_OK:
        _drop(L, D_DECRYPT, 1)
        return nwrite
    if _open_commit(kp, slot) != ST_OK:
        _drop(L, D_REPLAY, 1)             # a copy earlier in this batch got there first
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


cdef inline int _rx_round(loop_t *L, rx_t *rx, double now) noexcept nogil:
    """Steps 2 and 3 for the items collected so far: the cipher (on every lane), then
    each in order; returns how many packets wait for the TUN write."""
    cdef int j, nwrite = 0
    _crew_run(&L.crew_rx, CREW_OPEN, rx.items, rx.nitems, rx.item_bytes)
    for j in range(rx.nitems):
        nwrite = _rx_deliver(L, rx, j, now, nwrite)
    rx.nitems = 0
    rx.item_bytes = 0
    return nwrite


cdef void _rx_loop(loop_t *L) noexcept nogil:
    cdef rx_t *rx = <rx_t *>calloc(1, sizeof(rx_t))
    cdef int i, n, n4, ready, one = 1, nwrite
    cdef uint32_t off, seg, total
    cdef double now
    if rx == NULL:
        return
    rx.buf = <uint8_t *>malloc(RX_MSGS * RX_BUF)
    if L.vnet_hdr:
        rx.gro = <gro_state_t *>malloc(sizeof(gro_state_t))
        rx.arena = <uint8_t *>malloc(RX_ARENA)
    if rx.buf == NULL or (L.vnet_hdr and (rx.gro == NULL or rx.arena == NULL)):
        free(rx.buf)
        free(rx.gro)
        free(rx.arena)
        free(rx)
        return
    if rx.gro != NULL:
        gro_init(rx.gro, L.gro_seed)
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
        rx.nitems = 0
        rx.item_bytes = 0
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
                if rx.nitems >= RX_SEGS:
                    # a GRO batch of any size: open and write out what is ready, go on
                    _flush_tun(L, rx, _rx_round(L, rx, now))
                _rx_check(L, rx, i, rx.buf + i * RX_BUF + off,
                          seg if total - off > seg else total - off, now)
                off += seg
        nwrite = _rx_round(L, rx, now)
        pthread_rwlock_unlock(&L.lock)
        _flush_tun(L, rx, nwrite)
    OPENSSL_cleanse(rx.buf, RX_MSGS * RX_BUF)
    if rx.arena != NULL:
        OPENSSL_cleanse(rx.arena, RX_ARENA)
    free(rx.arena)
    free(rx.gro)
    free(rx.buf)
    free(rx)



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
                  int max_peers=65536, *, bint vnet_hdr=False, bint uso=False):
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
        # a TUN opened with IFF_VNET_HDR and TSO (uso: USO too, Linux 6.2+)
        self.L.vnet_hdr, self.L.uso = vnet_hdr, vnet_hdr and uso
        self.L.gro_seed = int.from_bytes(_os.urandom(8), "little")
        self.L.stop_fd = self.L.slow_fd = -1
        self.L.root4 = self.L.root6 = -1
        self.L.peers = <peer_t *>calloc(max_peers, sizeof(peer_t))
        if (self.L.peers == NULL or _ring_init(&self.L.slow, SLOW_CAP, sizeof(slow_t)) < 0
                or _ring_init(&self.L.hs, HS_CAP, sizeof(hs_t)) < 0):
            raise MemoryError()
        for i in range(max_peers):
            pthread_mutex_init(&self.L.peers[i].ep_lock, NULL)
        pthread_rwlockattr_init(&attr)
        # Python's updates must not starve behind two busy reader threads.
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        pthread_rwlock_init(&self.L.lock, &attr)
        _crew_init(&self.L.crew_tx, _LANES)
        _crew_init(&self.L.crew_rx, _LANES)
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
        _ring_free(&self.L.slow)
        _ring_free(&self.L.hs)
        _crew_destroy(&self.L.crew_tx)
        _crew_destroy(&self.L.crew_rx)
        pthread_rwlock_destroy(&self.L.lock)
        free(self.L.pend_keys)
        free(self.L.peers)
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

    def _run_helper(self, bint tx, int lane):
        with nogil:
            _crew_helper(&self.L.crew_tx if tx else &self.L.crew_rx, lane)

    @property
    def vnet_hdr(self) -> bool:
        """The TUN carries virtio headers: TSO/USO reads are split, writes coalesced."""
        return self.L.vnet_hdr

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        if self._threads:
            return
        self.L.stopping = False
        self.L.link_gone = False
        _crew_quit(&self.L.crew_tx, False)
        _crew_quit(&self.L.crew_rx, False)
        # helpers first: each lane > 0 of both directions (none with one lane)
        self._threads = [
            _threading.Thread(target=self._run_helper, args=(tx, lane),
                              name=f"ks-crypto-{'tx' if tx else 'rx'}{lane}", daemon=True)
            for tx in (True, False) for lane in range(1, _LANES)]
        self._threads += [
            _threading.Thread(target=self._run_tx, name="ks-fast-tx", daemon=True),
            _threading.Thread(target=self._run_rx, name="ks-fast-rx", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        cdef uint64_t junk
        if not self._threads:
            return
        self.L.stopping = True
        _signal(self.L.stop_fd)
        for t in self._threads[-2:]:           # the loop threads: no job is left after them
            t.join()
        _crew_quit(&self.L.crew_tx, True)
        _crew_quit(&self.L.crew_rx, True)
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
                e = <slow_t *>_ring_pop_begin(&self.L.slow)
            if e == NULL:
                break
            try:
                local = (PyBytes_FromStringAndSize(<char *>e.local, e.local_len),
                         e.local_ifindex) if e.local_len else None
                item = (e.kind, PyBytes_FromStringAndSize(<char *>e.data, e.length),
                        _sockaddr_tuple(&e.addr, e.addrlen), e.peer, local)
            finally:
                # consumed even if building it failed: a bad item cannot wedge the queue
                _ring_pop_end(&self.L.slow)
            out.append(item)
        if self.L.slow.count or self.L.hs.count:
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
                e = <hs_t *>_ring_pop_begin(&self.L.hs)
            if e == NULL:
                break
            try:
                local = (PyBytes_FromStringAndSize(<char *>e.local, e.local_len),
                         e.local_ifindex) if e.local_len else None
                item = (PyBytes_FromStringAndSize(<char *>e.data, e.length),
                        _sockaddr_tuple(&e.addr, e.addrlen), local)
            finally:
                _ring_pop_end(&self.L.hs)
            out.append(item)
        if self.L.hs.count:
            _signal(self.L.slow_fd)
        return out

    @property
    def handshake_backlog(self) -> int:
        """Handshake messages waiting in C (the "under load" signal is taken on it)."""
        return self.L.hs.count

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
    def udp_gso(self) -> bool:
        """Runs of same-size datagrams still leave as one UDP GSO send (False once
        the kernel said GSO cannot work here)."""
        return not self.L.no_gso

    @property
    def tx_packets(self) -> int:
        return self.L.tx_packets

    @property
    def rx_packets(self) -> int:
        return self.L.rx_packets

    @property
    def crypto_shared(self) -> tuple:
        """Packets the crypto-lane helpers sealed and opened (the loop threads' own
        share not counted): (tx, rx)."""
        return (KS_ATOMIC_LOAD64(&self.L.crew_tx.helped),
                KS_ATOMIC_LOAD64(&self.L.crew_rx.helped))
