"""Batched UDP and TUN I/O of the packet loop (inline only): waiting on the fds,
the per-thread batch buffers, sendmmsg with UDP GSO runs and a sticky source address
(IP_PKTINFO), recvmmsg with UDP GRO and the local address, and TUN writes."""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from kubespan_dp._wg_defs cimport *
from kubespan_dp._wg_crew cimport *
from kubespan_dp._wg_loop cimport *
from kubespan_dp._wg_offload cimport *
from kubespan_dp._wg_os cimport *


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
    crew_item_t items[LOOP_BATCH]    # prepared slots for the cipher (THE seal, step 2)


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


cdef inline void _send_plain(loop_t *L, int fd, mmsghdr *gso) noexcept nogil:
    # Resend one (possibly GSO) message as separate datagrams with no ancillary data.
    cdef mmsghdr one[GSO_SEGS]
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


cdef inline void _send_run(loop_t *L, int fd, mmsghdr *msgs, int32_t *peers, bint *pktinfo,
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
        if msgs[done].msg_hdr.msg_iovlen > 1 and (err == EIO or err == EINVAL):
            # EIO: the route's device cannot checksum UDP GSO for us (wireguard-go
            # turns GSO off on it too): never again.  EINVAL: this one message broke
            # a GSO limit.  Either way its datagrams go out one by one.  Any other
            # error (say, one peer unreachable) says nothing about GSO.
            if err == EIO:
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


cdef inline size_t _put_source(uint8_t *control, const uint8_t *src, uint8_t src_len,
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


cdef inline void _send_all(loop_t *L, io_t *io, int *fds, int nsend) noexcept nogil:
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
            while (j < nsend and j - i < GSO_SEGS and fds[j] == fds[i]
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
    crew_item_t items[RX_SEGS]       # checked messages for the cipher (THE open, step 2)
    int32_t item_msg[RX_SEGS]        # the message each came in
    int nitems
    size_t item_bytes
    uint8_t *wptr[RX_SEGS]           # decrypted packets waiting for the TUN write
    uint32_t wlen[RX_SEGS]
    # with a virtio header on the TUN (L.vnet_hdr): the coalescing scratch, the arena
    # the super-packets are built in and the writes gro_coalesce hands back
    gro_state_t *gro
    uint8_t *arena                   # RX_ARENA bytes
    uint8_t *optr[RX_SEGS]
    uint32_t olen[RX_SEGS]


cdef inline int _recv_batch(loop_t *L, rx_t *rx, int fd, int start) noexcept nogil:
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


cdef enum:
    # every decrypted byte the receive buffers can hold, plus a virtio header per packet:
    # gro_coalesce never runs out of arena (it would only write segments one by one)
    RX_ARENA = RX_MSGS * RX_BUF + RX_SEGS * 10


cdef inline void _flush_tun(loop_t *L, rx_t *rx, int nwrite) noexcept nogil:
    """Write the decrypted packets to TUN.  With a virtio header, TCP segments of one
    flow (and UDP datagrams, with USO) are coalesced first into super-packets: one
    write, one trip through the kernel's stack, instead of one per packet; each
    write is [virtio header][packet] (gro_coalesce puts a zero header in front of
    the packets written alone, in the transport header space before them)."""
    cdef int i, nout
    if L.vnet_hdr:
        nout = gro_coalesce(rx.gro, rx.wptr, rx.wlen, nwrite, L.uso, rx.arena, RX_ARENA,
                            rx.optr, rx.olen)
        if nout < 0:               # cannot happen: nwrite <= RX_SEGS = GRO_MAX_PACKETS
            _drop(L, D_TUN_WRITE, nwrite)
        for i in range(nout):
            if c_write(L.tun_fd, rx.optr[i], rx.olen[i]) < 0:
                _drop(L, D_TUN_WRITE, 1)
    else:
        for i in range(nwrite):
            if c_write(L.tun_fd, rx.wptr[i], rx.wlen[i]) < 0:
                _drop(L, D_TUN_WRITE, 1)
    KS_ATOMIC_ADD64(&L.rx_packets, nwrite)
