"""TUN offloads in C (inline only, no Python objects): the virtio_net_hdr that a TUN
opened with IFF_VNET_HDR puts in front of every packet, Internet checksums, TX
segmentation of the kernel's TSO/USO super-packets (gso_split) and RX coalescing of
decrypted packets into super-packets for the kernel (gro_coalesce).

Facts from the kernel's include/uapi/linux/virtio_net.h and wireguard-go's
tun/offload_linux.go; the coalescing rules follow the kernel's TCP/UDP GRO.

Every packet handed to these functions is treated as hostile: lengths come from
the caller, everything else is checked before it is used.
"""
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

cdef extern from *:
    """
    #define KS_VNET_HDR_LEN 10
    #define KS_VNET_F_NEEDS_CSUM 1      /* csum_start/csum_offset say what to finish */
    #define KS_VNET_F_DATA_VALID 2      /* the kernel checked the checksum (ignored) */
    #define KS_VNET_GSO_NONE 0
    #define KS_VNET_GSO_TCPV4 1
    #define KS_VNET_GSO_UDP 3           /* UFO: never produced or accepted here */
    #define KS_VNET_GSO_TCPV6 4
    #define KS_VNET_GSO_UDP_L4 5        /* USO (Linux 6.2+) */
    #define KS_VNET_GSO_ECN 0x80        /* TCP: the first segment carries CWR */
    /* The legacy virtio header is in host byte order (TUN without TUNSETVNETLE/BE). A
       16-bit big-endian wire value as it adds up in a native-order checksum sum. */
    static inline uint16_t ks_ofl_ne16(uint16_t v) {
    #if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        return __builtin_bswap16(v);
    #else
        return v;
    #endif
    }
    """
    const int VIRTIO_NET_HDR_LEN "KS_VNET_HDR_LEN"
    const uint8_t VIRTIO_NET_HDR_F_NEEDS_CSUM "KS_VNET_F_NEEDS_CSUM"
    const uint8_t VIRTIO_NET_HDR_F_DATA_VALID "KS_VNET_F_DATA_VALID"
    const uint8_t VIRTIO_NET_HDR_GSO_NONE "KS_VNET_GSO_NONE"
    const uint8_t VIRTIO_NET_HDR_GSO_TCPV4 "KS_VNET_GSO_TCPV4"
    const uint8_t VIRTIO_NET_HDR_GSO_UDP "KS_VNET_GSO_UDP"
    const uint8_t VIRTIO_NET_HDR_GSO_TCPV6 "KS_VNET_GSO_TCPV6"
    const uint8_t VIRTIO_NET_HDR_GSO_UDP_L4 "KS_VNET_GSO_UDP_L4"
    const uint8_t VIRTIO_NET_HDR_GSO_ECN "KS_VNET_GSO_ECN"
    uint16_t _ofl_ne16 "ks_ofl_ne16"(uint16_t v) nogil


# Errors of gso_split / csum_complete (negative returns).
cdef enum:
    OFL_E_SHORT = -1        # the packet ends before its headers do
    OFL_E_HEADER = -2       # a malformed virtio header (type, sizes, offsets)
    OFL_E_PROTOCOL = -3     # the IP packet does not match the GSO type
    OFL_E_TOO_MANY = -4     # more segments than slots
    OFL_E_TOO_BIG = -5      # a segment (or the GSO_NONE packet) exceeds max_len
    OFL_E_ARGS = -6         # bad arguments from the caller (n too large, ...)

cdef enum:
    GRO_MAX_PACKETS = 2048  # the most packets one gro_coalesce call takes
    GRO_TABLE = 4096        # flow table slots (power of two, 2x the packets)
    GRO_PROBES = 64         # a lookup longer than this stops coalescing for the call
    GRO_BARRIERS = 1024     # address-pair barrier counters (power of two)
    GRO_UDP_MAX_SEGS = 64   # the kernel's UDP_MAX_SEGMENTS (refuses more on write)

# TCP flags (byte 13 of the header)
cdef enum:
    _OFL_FIN = 0x01
    _OFL_SYN = 0x02
    _OFL_RST = 0x04
    _OFL_PSH = 0x08
    _OFL_ACK = 0x10
    _OFL_URG = 0x20
    _OFL_CWR = 0x80

# what _ofl_classify makes of one decrypted packet
cdef enum:
    _OFL_OTHER = 0          # nothing to track (ICMP, garbage)
    _OFL_PAIR = 1           # no ports to see (fragment, extension header, ...): barrier
    _OFL_FLOW = 2           # TCP/UDP with ports but not coalescable: ends its flow's run
    _OFL_TCP = 3            # a TCP candidate
    _OFL_UDP = 4            # a UDP candidate

cdef enum:
    _OFL_SINGLE = -1        # gro run_of[]: written on its own
    _OFL_MEMBER = -2        # gro run_of[]: inside a run whose head is earlier


cdef struct vnet_hdr_t:
    uint8_t flags
    uint8_t gso_type
    uint16_t hdr_len
    uint16_t gso_size
    uint16_t csum_start
    uint16_t csum_offset


cdef struct gro_run_t:
    int32_t head            # packet index of the first segment
    int32_t tail            # packet index of the last segment so far
    uint32_t count          # segments
    uint32_t total          # IP length of the coalesced packet so far
    uint32_t gso            # payload of the head: every segment but the last has it
    uint32_t next_seq       # TCP: the sequence number that may follow
    uint32_t barrier        # the address pair's barrier counter when the run began
    uint32_t epoch          # gro_state_t.epoch when the run began
    uint16_t iphl           # IP header length
    uint16_t hlen           # IP + TCP/UDP header length
    uint16_t bslot          # the address pair's barrier slot
    uint8_t proto           # 6 or 17
    uint8_t v6
    uint8_t closed          # nothing more may be appended
    uint8_t verified        # the head's checksums were checked


cdef struct _ofl_slot_t:
    uint32_t gen            # == gro_state_t.gen: the slot is in use in this call
    int32_t run


cdef struct gro_state_t:
    # Scratch for gro_coalesce: allocate once (about 130 KiB), gro_init, reuse.
    uint64_t seed
    uint32_t gen
    uint32_t epoch
    int32_t nruns
    _ofl_slot_t table[GRO_TABLE]
    uint32_t barrier[GRO_BARRIERS]
    gro_run_t runs[GRO_MAX_PACKETS]
    int32_t next[GRO_MAX_PACKETS]
    int32_t run_of[GRO_MAX_PACKETS]


cdef struct _ofl_info_t:
    uint8_t kind
    uint8_t v6
    uint8_t proto
    uint16_t iphl
    uint16_t hlen
    uint32_t payload


# --------------------------------------------------------------------------- bytes

cdef inline uint16_t _ofl_be16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline uint32_t _ofl_be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void _ofl_put16(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v


cdef inline void _ofl_put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


# --------------------------------------------------------------------------- virtio_net_hdr

cdef inline void vnet_parse(const uint8_t *p, vnet_hdr_t *h) noexcept nogil:
    """The 10 bytes at p (host byte order) into h."""
    h.flags = p[0]
    h.gso_type = p[1]
    memcpy(&h.hdr_len, p + 2, 2)
    memcpy(&h.gso_size, p + 4, 2)
    memcpy(&h.csum_start, p + 6, 2)
    memcpy(&h.csum_offset, p + 8, 2)


cdef inline void vnet_build(uint8_t *p, const vnet_hdr_t *h) noexcept nogil:
    """h into the 10 bytes at p (host byte order)."""
    p[0] = h.flags
    p[1] = h.gso_type
    memcpy(p + 2, &h.hdr_len, 2)
    memcpy(p + 4, &h.gso_size, 2)
    memcpy(p + 6, &h.csum_start, 2)
    memcpy(p + 8, &h.csum_offset, 2)


# --------------------------------------------------------------------------- checksums
# Sums are kept in native byte order (RFC 1071: the ones' complement sum does not
# care); 16-bit results are stored with memcpy, which puts the bytes right.

cdef inline uint64_t csum_add(const uint8_t *p, size_t n, uint64_t acc) noexcept nogil:
    """acc plus the ones' complement sum of p[0:n] (native order, not folded). A
    region that does not start the summed data must start at an even offset."""
    cdef uint64_t v
    cdef uint32_t w
    cdef uint16_t h
    while n >= 16:
        memcpy(&v, p, 8)
        acc += (v & 0xFFFFFFFFu) + (v >> 32)
        memcpy(&v, p + 8, 8)
        acc += (v & 0xFFFFFFFFu) + (v >> 32)
        p += 16
        n -= 16
    if n >= 8:
        memcpy(&v, p, 8)
        acc += (v & 0xFFFFFFFFu) + (v >> 32)
        p += 8
        n -= 8
    if n >= 4:
        memcpy(&w, p, 4)
        acc += w
        p += 4
        n -= 4
    if n >= 2:
        memcpy(&h, p, 2)
        acc += h
        p += 2
        n -= 2
    if n:
        h = 0
        (<uint8_t *>&h)[0] = p[0]      # the odd byte is the high half of a word
        acc += h
    return acc


cdef inline uint16_t csum_fold(uint64_t acc) noexcept nogil:
    """A sum from csum_add folded to 16 bits (native order, not complemented)."""
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return <uint16_t>acc


cdef inline uint64_t csum_pseudo(const uint8_t *ip, bint v6, uint8_t proto,
                                 uint32_t l4_len) noexcept nogil:
    """The unfolded pseudo-header sum of the IPv4/IPv6 header at ip (addresses at
    12..19 or 8..39) for a TCP/UDP segment of l4_len bytes."""
    cdef uint64_t acc
    if v6:
        acc = csum_add(ip + 8, 32, 0)
    else:
        acc = csum_add(ip + 12, 8, 0)
    return (acc + _ofl_ne16(proto) + _ofl_ne16(<uint16_t>(l4_len >> 16))
            + _ofl_ne16(<uint16_t>(l4_len & 0xFFFF)))


cdef inline void _ofl_store_csum(uint8_t *at, uint64_t acc, bint udp) noexcept nogil:
    # the final checksum of a sum taken with a zero checksum field; UDP sends a
    # computed 0 as 0xFFFF (0 means "no checksum")
    cdef uint16_t c = <uint16_t>~csum_fold(acc)
    if udp and c == 0:
        c = 0xFFFF
    memcpy(at, &c, 2)


cdef inline int csum_complete(uint8_t *pkt, size_t length, uint16_t csum_start,
                              uint16_t csum_offset) noexcept nogil:
    """Finish a VIRTIO_NET_HDR_F_NEEDS_CSUM checksum in place: the field at
    csum_start + csum_offset holds the pseudo-header partial sum; the checksum
    covers pkt[csum_start:length].  0, or OFL_E_HEADER when the field does not lie
    inside the packet."""
    cdef size_t at = <size_t>csum_start + csum_offset
    cdef uint64_t acc
    if at + 2 > length:
        return OFL_E_HEADER
    acc = csum_add(pkt + csum_start, length - csum_start, 0)   # includes the partial sum
    memset(pkt + at, 0, 2)
    _ofl_store_csum(pkt + at, acc, True)   # 0 -> 0xFFFF: the kernel's CSUM_MANGLED_0
    return 0


cdef inline bint _ofl_l4_valid(const uint8_t *pkt, uint32_t length, uint16_t iphl,
                               bint v6, uint8_t proto) noexcept nogil:
    # the TCP/UDP checksum of a whole packet verifies
    cdef uint64_t acc = csum_pseudo(pkt, v6, proto, length - iphl)
    return csum_fold(csum_add(pkt + iphl, length - iphl, acc)) == 0xFFFF


# --------------------------------------------------------------------------- TX: segmentation

cdef inline int gso_split(const vnet_hdr_t *h, const uint8_t *pkt, size_t length,
                          uint8_t *slot0, size_t stride, size_t off, size_t max_len,
                          int max_slots, uint32_t *out_len) noexcept nogil:
    """Split one packet read from TUN (after its virtio header h) into IP packets.

    Segment k goes to slot0 + k*stride + off, out_len[k] its length; the return is
    the number of segments, or an OFL_E_* error (< 0) with nothing written.  Only
    bytes [slot_k + off, slot_k + off + out_len[k]) of slots k < max_slots are
    written, out_len[k] <= max_len; pkt[0:length] is only read and must not overlap
    the slots.

    GSO_NONE: the packet is copied to slot 0 (its NEEDS_CSUM checksum finished).
    TCPV4/TCPV6/UDP_L4: segments of gso_size payload bytes (TCP: fewer when a
    segment would exceed max_len; UDP datagrams cannot shrink: OFL_E_TOO_BIG), with
    per-segment IP lengths, IPv4 id + k and header checksum, TCP sequence numbers
    (FIN/PSH only on the last segment, CWR only on the first), UDP lengths and the
    TCP/UDP checksums.  The header lengths come from the packet: the kernel's hdr_len
    is only a hint (skb_headlen) and is merely bounds-checked.
    """
    cdef int total
    return gso_split_part(h, pkt, length, 0, slot0, stride, off, max_len, max_slots, out_len,
                          &total, True)


cdef inline int gso_split_part(const vnet_hdr_t *h, const uint8_t *pkt, size_t length,
                               size_t first, uint8_t *slot0, size_t stride, size_t off,
                               size_t max_len, int max_slots, uint32_t *out_len, int *total,
                               bint whole=False) noexcept nogil:
    """gso_split from segment ``first`` on, as many as fit in max_slots (at least 1):
    segment first + k goes to slot k; *total is the packet's segment count, the return
    how many were written (or OFL_E_*).  Calls from first = 0 on, each starting where
    the last one stopped, make exactly gso_split's segments, so a super-packet of more
    segments than there are slots is split across batches.  ``whole``: all or
    OFL_E_TOO_MANY."""
    cdef uint8_t gso = h.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    cdef uint8_t ver, proto, flags = 0, fl
    cdef size_t iphl, l4hl, hlen, payload, mss, seg, tot, k, nseg, csum_off, last
    cdef uint32_t seq = 0
    cdef uint16_t ipid = 0, c
    cdef uint64_t acc0
    cdef uint8_t *o
    cdef bint v6, tcp
    if max_slots < 1:
        return OFL_E_TOO_MANY
    if max_len > 65535:
        max_len = 65535                # IP length fields
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        if h.gso_type != gso:
            return OFL_E_HEADER        # ECN without GSO
        if length == 0:
            return OFL_E_SHORT
        if length > max_len:
            return OFL_E_TOO_BIG
        if (h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM
                and <size_t>h.csum_start + h.csum_offset + 2 > length):
            return OFL_E_HEADER
        memcpy(slot0 + off, pkt, length)
        if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            csum_complete(slot0 + off, length, h.csum_start, h.csum_offset)
        out_len[0] = <uint32_t>length
        total[0] = 1
        return 1 if first == 0 else OFL_E_ARGS
    if gso != VIRTIO_NET_HDR_GSO_TCPV4 and gso != VIRTIO_NET_HDR_GSO_TCPV6 \
            and gso != VIRTIO_NET_HDR_GSO_UDP_L4:
        return OFL_E_HEADER
    tcp = gso != VIRTIO_NET_HDR_GSO_UDP_L4
    if not tcp and h.gso_type != gso:
        return OFL_E_HEADER            # ECN is a TCP thing
    if h.gso_size == 0 or not (h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) or h.hdr_len > length:
        return OFL_E_HEADER
    if length < 20:
        return OFL_E_SHORT
    ver = pkt[0] >> 4
    if ver == 4:
        if gso == VIRTIO_NET_HDR_GSO_TCPV6:
            return OFL_E_PROTOCOL
        v6 = False
        iphl = (pkt[0] & 0x0F) * 4
        if iphl < 20:
            return OFL_E_PROTOCOL
        if length < iphl:
            return OFL_E_SHORT
        if (pkt[6] & 0x3F) or pkt[7]:
            return OFL_E_PROTOCOL      # MF or a fragment offset: not a whole datagram
        proto = pkt[9]
    elif ver == 6:
        if gso == VIRTIO_NET_HDR_GSO_TCPV4:
            return OFL_E_PROTOCOL
        v6 = True
        iphl = 40
        if length < iphl:
            return OFL_E_SHORT
        proto = pkt[6]                 # extension headers are not supported
    else:
        return OFL_E_PROTOCOL
    csum_off = 16 if tcp else 6
    if h.csum_start != iphl or h.csum_offset != csum_off:
        return OFL_E_HEADER
    if tcp:
        if proto != 6:
            return OFL_E_PROTOCOL
        if length < iphl + 20:
            return OFL_E_SHORT
        l4hl = (pkt[iphl + 12] >> 4) * 4
        if l4hl < 20:
            return OFL_E_PROTOCOL
    else:
        if proto != 17:
            return OFL_E_PROTOCOL
        l4hl = 8
    hlen = iphl + l4hl
    if length <= hlen:
        return OFL_E_SHORT             # no payload to split
    if hlen >= max_len:
        return OFL_E_TOO_BIG
    payload = length - hlen
    mss = h.gso_size
    if hlen + mss > max_len:
        if not tcp:
            return OFL_E_TOO_BIG       # a datagram boundary cannot move
        mss = max_len - hlen           # TCP does not care where segments end
    nseg = (payload + mss - 1) // mss
    total[0] = <int>nseg
    if first >= nseg:
        return OFL_E_ARGS
    if nseg - first > <size_t>max_slots:
        if whole:
            return OFL_E_TOO_MANY
        last = first + max_slots
    else:
        last = nseg
    if tcp:
        seq = _ofl_be32(pkt + iphl + 4)
        flags = pkt[iphl + 13]
    if not v6:
        ipid = _ofl_be16(pkt + 4)
    acc0 = csum_pseudo(pkt, v6, proto, 0)
    for k in range(first, last):
        o = slot0 + (k - first) * stride + off
        seg = payload - k * mss
        if seg > mss:
            seg = mss
        tot = hlen + seg
        memcpy(o, pkt, hlen)
        memcpy(o + hlen, pkt + hlen + k * mss, seg)
        if v6:
            _ofl_put16(o + 4, <uint32_t>(tot - 40))
        else:
            _ofl_put16(o + 2, <uint32_t>tot)
            _ofl_put16(o + 4, <uint16_t>(ipid + k))
            o[10] = 0
            o[11] = 0
            c = <uint16_t>~csum_fold(csum_add(o, iphl, 0))
            memcpy(o + 10, &c, 2)
        if tcp:
            _ofl_put32(o + iphl + 4, <uint32_t>(seq + k * mss))
            fl = flags
            if k > 0:
                fl &= ~_OFL_CWR
            if k + 1 < nseg:
                fl &= ~(_OFL_FIN | _OFL_PSH)
            o[iphl + 13] = fl
        else:
            _ofl_put16(o + iphl + 4, <uint32_t>(tot - iphl))
        o[iphl + csum_off] = 0
        o[iphl + csum_off + 1] = 0
        # the pseudo-header length word: acc0 was taken with a zero length
        _ofl_store_csum(o + iphl + csum_off,
                        csum_add(o + iphl, tot - iphl, acc0 + _ofl_ne16(<uint16_t>(tot - iphl))),
                        not tcp)
        out_len[k - first] = <uint32_t>tot
    return <int>(last - first)


# --------------------------------------------------------------------------- RX: coalescing

cdef inline void gro_init(gro_state_t *g, uint64_t seed) noexcept nogil:
    """Prepare fresh scratch; seed (random) keys the flow hash against collisions."""
    memset(g, 0, sizeof(gro_state_t))
    g.seed = seed | 1


cdef inline bint _ofl_ipv4_header_ok(const uint8_t *p) noexcept nogil:
    return csum_fold(csum_add(p, 20, 0)) == 0xFFFF


cdef inline void _ofl_classify(const uint8_t *p, uint32_t length, bint uso,
                               _ofl_info_t *info) noexcept nogil:
    cdef uint16_t ihl
    cdef uint32_t doff
    cdef uint8_t flags
    info.kind = _OFL_OTHER
    info.payload = 0
    if length < 20 or length > 65535:
        return
    if p[0] >> 4 == 4:
        ihl = (p[0] & 0x0F) * 4
        if ihl < 20 or length < ihl:
            return
        info.v6 = 0
        info.proto = p[9]
        info.iphl = ihl
        if _ofl_be16(p + 2) != length or (p[6] & 0x3F) or p[7]:
            info.kind = _OFL_PAIR      # fragments: no ports, still the same hosts
            return
        if info.proto != 6 and info.proto != 17:
            info.kind = _OFL_OTHER if info.proto == 1 else _OFL_PAIR
            return
    elif p[0] >> 4 == 6:
        if length < 40:
            return
        info.v6 = 1
        info.proto = p[6]
        info.iphl = 40
        if <uint32_t>_ofl_be16(p + 4) + 40 != length:
            info.kind = _OFL_PAIR
            return
        if info.proto != 6 and info.proto != 17:
            # extension headers hide the ports: treat like a fragment
            info.kind = _OFL_OTHER if info.proto == 58 else _OFL_PAIR
            return
    else:
        return
    if info.proto == 17:
        if length < <uint32_t>info.iphl + 8:
            info.kind = _OFL_PAIR
            return
        info.kind = _OFL_FLOW
        if not uso or (info.iphl != 20 and not info.v6):
            return
        if _ofl_be16(p + info.iphl + 4) != length - info.iphl:
            return
        if not info.v6 and (_ofl_be16(p + 26) == 0 or not _ofl_ipv4_header_ok(p)):
            return                     # no checksum to verify, or a bad header
        info.hlen = info.iphl + 8
        info.payload = length - info.hlen
        if info.payload:
            info.kind = _OFL_UDP
        return
    if length < <uint32_t>info.iphl + 20:
        info.kind = _OFL_PAIR
        return
    info.kind = _OFL_FLOW
    if info.iphl != 20 and not info.v6:
        return                         # IPv4 options
    doff = (p[info.iphl + 12] >> 4) * 4
    if doff < 20 or length < info.iphl + doff:
        return
    flags = p[info.iphl + 13]
    if not (flags & _OFL_ACK) or flags & (_OFL_SYN | _OFL_FIN | _OFL_RST | _OFL_URG):
        return
    if not info.v6 and not _ofl_ipv4_header_ok(p):
        return
    info.hlen = <uint16_t>(info.iphl + doff)
    info.payload = length - info.hlen
    if info.payload:
        info.kind = _OFL_TCP


cdef inline uint64_t _ofl_mix(uint64_t h, const uint8_t *p, size_t n) noexcept nogil:
    # n is a multiple of 4
    cdef uint32_t w
    cdef size_t i = 0
    while i < n:
        memcpy(&w, p + i, 4)
        h = (h ^ w) * <uint64_t>0x9E3779B97F4A7C15u
        h ^= h >> 29
        i += 4
    return h


cdef inline uint32_t _ofl_pair_slot(const gro_state_t *g, const uint8_t *p, bint v6) noexcept nogil:
    cdef uint64_t h
    if v6:
        h = _ofl_mix(g.seed ^ 6, p + 8, 32)
    else:
        h = _ofl_mix(g.seed ^ 4, p + 12, 8)
    return <uint32_t>(h >> 32) & (GRO_BARRIERS - 1)


cdef inline uint64_t _ofl_flow_hash(const gro_state_t *g, const uint8_t *p,
                                    const _ofl_info_t *info) noexcept nogil:
    cdef uint64_t h
    if info.v6:
        h = _ofl_mix(g.seed ^ (0x600 | info.proto), p + 8, 32)
    else:
        h = _ofl_mix(g.seed ^ (0x400 | info.proto), p + 12, 8)
    h = _ofl_mix(h, p + info.iphl, 4)     # the ports
    return h ^ (h >> 32)


cdef inline bint _ofl_same_flow(const gro_run_t *r, const uint8_t *head, const uint8_t *p,
                                const _ofl_info_t *info) noexcept nogil:
    if r.v6 != info.v6 or r.proto != info.proto:
        return False
    if info.v6:
        if memcmp(head + 8, p + 8, 32) != 0:
            return False
    elif memcmp(head + 12, p + 12, 8) != 0:
        return False
    return memcmp(head + r.iphl, p + info.iphl, 4) == 0


cdef inline int32_t _ofl_find(gro_state_t *g, uint8_t **pkts, const uint8_t *p,
                              const _ofl_info_t *info, int32_t *slot) noexcept nogil:
    # The open run of p's flow (-1: none) and the table slot it has or would get
    # (*slot -1: the probe limit was hit).
    cdef uint32_t s = <uint32_t>_ofl_flow_hash(g, p, info) & (GRO_TABLE - 1)
    cdef int k
    cdef gro_run_t *r
    for k in range(GRO_PROBES):
        if g.table[s].gen != g.gen:
            slot[0] = <int32_t>s
            return -1
        r = &g.runs[g.table[s].run]
        if _ofl_same_flow(r, pkts[r.head], p, info):
            slot[0] = <int32_t>s
            return g.table[s].run
        s = (s + 1) & (GRO_TABLE - 1)
    slot[0] = -1
    return -1


cdef inline bint _ofl_can_append(const gro_state_t *g, const gro_run_t *r, const uint8_t *h,
                                 const uint8_t *p, const _ofl_info_t *info,
                                 uint32_t bslot) noexcept nogil:
    # May p (same flow as the run's head h) follow the run's tail?
    cdef uint16_t t = r.iphl
    if r.closed or r.epoch != g.epoch or g.barrier[bslot] != r.barrier:
        return False
    if info.payload > r.gso or r.total + info.payload > 65535:
        return False
    if info.v6:
        if memcmp(h, p, 4) != 0 or h[7] != p[7]:
            return False               # traffic class, flow label, hop limit
    elif h[1] != p[1] or h[6] != p[6] or h[8] != p[8]:
        return False                   # TOS, DF (and the reserved bit), TTL
    if info.proto == 17:
        return r.count < GRO_UDP_MAX_SEGS
    # TCP, as the kernel's tcp_gro_receive: same ack, data offset, flags but
    # CWR/PSH, window and options; no CWR after the first; contiguous sequence
    if info.hlen != r.hlen or _ofl_be32(p + t + 4) != r.next_seq:
        return False
    if p[t + 13] & _OFL_CWR:
        return False
    if (memcmp(h + t + 8, p + t + 8, 5) != 0
            or (h[t + 13] ^ p[t + 13]) & ~(_OFL_CWR | _OFL_PSH)
            or memcmp(h + t + 14, p + t + 14, 2) != 0):
        return False
    return memcmp(h + t + 20, p + t + 20, r.hlen - t - 20) == 0


cdef inline void _ofl_build(const gro_run_t *r, uint8_t **pkts, const uint32_t *lens,
                            const int32_t *nxt, uint8_t *dst) noexcept nogil:
    # The run as one [virtio header][super-packet] at dst (VIRTIO_NET_HDR_LEN + total).
    cdef uint8_t *ip = dst + VIRTIO_NET_HDR_LEN
    cdef uint8_t *l4
    cdef uint32_t pos, l4len, n
    cdef int32_t j, last
    cdef uint16_t c
    cdef vnet_hdr_t vh
    memcpy(ip, pkts[r.head], lens[r.head])
    pos = lens[r.head]
    last = r.head
    j = nxt[r.head]
    while j >= 0:
        n = lens[j] - r.hlen
        memcpy(ip + pos, pkts[j] + r.hlen, n)
        pos += n
        last = j
        j = nxt[j]
    l4 = ip + r.iphl
    l4len = r.total - r.iphl
    if r.v6:
        _ofl_put16(ip + 4, l4len)
    else:
        _ofl_put16(ip + 2, r.total)
        ip[10] = 0
        ip[11] = 0
        c = <uint16_t>~csum_fold(csum_add(ip, 20, 0))
        memcpy(ip + 10, &c, 2)
    vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM     # CHECKSUM_PARTIAL in the skb
    vh.hdr_len = r.hlen
    vh.gso_size = <uint16_t>r.gso
    vh.csum_start = r.iphl
    if r.proto == 6:
        l4[13] = (l4[13] & ~_OFL_PSH) | (pkts[last][r.iphl + 13] & _OFL_PSH)
        vh.gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if r.v6 else VIRTIO_NET_HDR_GSO_TCPV4
        if l4[13] & _OFL_CWR:
            vh.gso_type |= VIRTIO_NET_HDR_GSO_ECN
        vh.csum_offset = 16
    else:
        _ofl_put16(l4 + 4, l4len)
        vh.gso_type = VIRTIO_NET_HDR_GSO_UDP_L4
        vh.csum_offset = 6
    # the partial checksum the kernel finishes: the folded pseudo-header sum
    c = csum_fold(csum_pseudo(ip, r.v6, r.proto, l4len))
    memcpy(l4 + vh.csum_offset, &c, 2)
    vnet_build(dst, &vh)


cdef inline int gro_coalesce(gro_state_t *g, uint8_t **pkts, const uint32_t *lens, int n,
                             bint uso, uint8_t *arena, size_t arena_cap,
                             uint8_t **out, uint32_t *out_len) noexcept nogil:
    """Coalesce n decrypted IP packets (pkts[i], lens[i] bytes) for writing to a TUN
    with IFF_VNET_HDR; returns the number of writes m (out[0:m], out_len[0:m]: one
    write() each of [virtio header][IP packet]), or OFL_E_ARGS if n > GRO_MAX_PACKETS.

    TCP segments of one flow (addresses, ports) that continue each other (sequence,
    same ack, data offset, options, flags but CWR/PSH, window; IPv4 TOS/DF/TTL or
    IPv6 first word/hop limit; no IPv4 options or fragments; SYN/FIN/RST/URG never;
    CWR only first, PSH only last; every payload gso_size = the first's, the last not
    longer; at most 65535 bytes) become one GSO_TCPV4/TCPV6 super-packet with
    NEEDS_CSUM; with uso, UDP datagrams likewise become GSO_UDP_L4 (at most 64).
    Checksums of coalesced packets (IPv4 header, TCP/UDP) are verified first, as
    the kernel will not look again: a packet that fails is written on its own, and
    the kernel drops it.  Everything else goes out unchanged behind a zero header.
    Outputs follow input order (a super-packet where its first segment was), and a
    flow's run ends at any packet of that flow (same addresses and ports, or same
    addresses when ports cannot be seen) that does not join it: no packet overtakes
    another of its flow.

    Memory: coalesced packets are built in arena[0:arena_cap] (each takes
    VIRTIO_NET_HDR_LEN + its length; arena_cap >= sum(lens) + VIRTIO_NET_HDR_LEN * n
    always suffices, a run that does not fit is written segment by segment).  A
    packet written on its own gets its header in place: pkts[i] - VIRTIO_NET_HDR_LEN
    .. pkts[i] must be writable and belong to no other packet or the arena (the
    WireGuard header in front of a decrypted payload qualifies).  out/out_len have
    room for n entries.  The packets themselves are not modified.
    """
    cdef _ofl_info_t info
    cdef gro_run_t *run
    cdef int32_t i, r, slot, j, nout = 0
    cdef uint32_t bslot
    cdef size_t used = 0, need
    if n < 0 or n > GRO_MAX_PACKETS:
        return OFL_E_ARGS
    g.gen += 1
    if g.gen == 0:                     # wrapped: stale slots would look live
        memset(g.table, 0, sizeof(g.table))
        g.gen = 1
    g.nruns = 0
    for i in range(n):
        g.next[i] = -1
        g.run_of[i] = _OFL_SINGLE
        _ofl_classify(pkts[i], lens[i], uso, &info)
        if info.kind == _OFL_OTHER:
            continue
        bslot = _ofl_pair_slot(g, pkts[i], info.v6)
        if info.kind == _OFL_PAIR:
            g.barrier[bslot] += 1      # ends every run between these hosts
            continue
        r = _ofl_find(g, pkts, pkts[i], &info, &slot)
        if slot < 0:
            g.epoch += 1               # crowded table: end every run, keep order
            continue
        if info.kind == _OFL_FLOW:
            if r >= 0:
                g.runs[r].closed = 1
            continue
        if r >= 0:
            run = &g.runs[r]
            if _ofl_can_append(g, run, pkts[run.head], pkts[i], &info, bslot):
                if not run.verified:
                    run.verified = _ofl_l4_valid(pkts[run.head], lens[run.head], run.iphl,
                                                 run.v6, run.proto)
                if run.verified:
                    if not _ofl_l4_valid(pkts[i], lens[i], info.iphl, info.v6, info.proto):
                        run.closed = 1     # a corrupt packet goes out alone, in order
                        continue
                    g.next[run.tail] = i
                    g.run_of[i] = _OFL_MEMBER
                    run.tail = i
                    run.count += 1
                    run.total += info.payload
                    run.next_seq += info.payload
                    if info.payload < run.gso:
                        run.closed = 1     # only the last may be short
                    if info.proto == 6 and pkts[i][info.iphl + 13] & _OFL_PSH:
                        run.closed = 1     # PSH ends a run
                    continue
                # the head is corrupt: it stays alone, this packet starts a new run
        # a new run (it replaces the flow's old one in the table)
        r = g.nruns
        g.nruns += 1
        run = &g.runs[r]
        run.head = i
        run.tail = i
        run.count = 1
        run.total = lens[i]
        run.gso = info.payload
        run.next_seq = 0
        run.closed = 0
        if info.proto == 6:
            run.next_seq = _ofl_be32(pkts[i] + info.iphl + 4) + info.payload
            run.closed = (pkts[i][info.iphl + 13] & _OFL_PSH) != 0
        run.barrier = g.barrier[bslot]
        run.bslot = <uint16_t>bslot
        run.epoch = g.epoch
        run.iphl = info.iphl
        run.hlen = info.hlen
        run.proto = info.proto
        run.v6 = info.v6
        run.verified = 0
        g.table[slot].gen = g.gen
        g.table[slot].run = r
        g.run_of[i] = r
    for i in range(n):
        r = g.run_of[i]
        if r == _OFL_MEMBER:
            continue
        if r >= 0 and g.runs[r].count > 1:
            run = &g.runs[r]
            need = VIRTIO_NET_HDR_LEN + run.total
            if arena_cap - used >= need:
                _ofl_build(run, pkts, lens, g.next, arena + used)
                out[nout] = arena + used
                out_len[nout] = <uint32_t>need
                nout += 1
                used += need
                continue
            j = g.next[i]              # no room: each segment on its own, in place
            while j >= 0:
                g.run_of[j] = _OFL_SINGLE
                j = g.next[j]
        memset(pkts[i] - VIRTIO_NET_HDR_LEN, 0, VIRTIO_NET_HDR_LEN)
        out[nout] = pkts[i] - VIRTIO_NET_HDR_LEN
        out_len[nout] = lens[i] + VIRTIO_NET_HDR_LEN
        nout += 1
    return nout
