# cython: language_level=3, boundscheck=False, wraparound=False
"""Python wrappers of the TUN offload kernels in _wg_offload.pxd, for tests and
tools (the packet loop calls the C functions directly).

Each call copies its inputs into buffers of exactly their size (so a sanitizer
sees any read past them) and checks that nothing outside the documented output
areas was written.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset

from kubespan_dp._wg_offload cimport (
    GRO_MAX_PACKETS as _GRO_MAX_PACKETS,
    OFL_E_ARGS,
    OFL_E_HEADER,
    OFL_E_PROTOCOL,
    OFL_E_SHORT,
    OFL_E_TOO_BIG,
    OFL_E_TOO_MANY,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_LEN,
    csum_add,
    csum_complete,
    csum_fold,
    gro_coalesce,
    gro_init,
    gro_state_t,
    gso_split,
    gso_split_part,
    vnet_build,
    vnet_hdr_t,
    vnet_parse,
)

VNET_HDR_LEN = VIRTIO_NET_HDR_LEN
F_NEEDS_CSUM = VIRTIO_NET_HDR_F_NEEDS_CSUM
F_DATA_VALID = VIRTIO_NET_HDR_F_DATA_VALID
GSO_NONE = VIRTIO_NET_HDR_GSO_NONE
GSO_TCPV4 = VIRTIO_NET_HDR_GSO_TCPV4
GSO_UDP = VIRTIO_NET_HDR_GSO_UDP
GSO_TCPV6 = VIRTIO_NET_HDR_GSO_TCPV6
GSO_UDP_L4 = VIRTIO_NET_HDR_GSO_UDP_L4
GSO_ECN = VIRTIO_NET_HDR_GSO_ECN
GRO_MAX_PACKETS = _GRO_MAX_PACKETS

ERRORS = {
    OFL_E_SHORT: "short",
    OFL_E_HEADER: "header",
    OFL_E_PROTOCOL: "protocol",
    OFL_E_TOO_MANY: "too_many",
    OFL_E_TOO_BIG: "too_big",
    OFL_E_ARGS: "args",
}

cdef enum:
    _GUARD = 0xA5
    _SLOT_OFF = 16      # the loop's slots keep the IP packet 16 bytes in
    _HEADROOM = 16


class OffloadError(ValueError):
    """A kernel function refused its input; ``reason`` is a value of ERRORS."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.reason = ERRORS.get(code, str(code))
        super().__init__(self.reason)


def vnet_header(int flags=0, int gso_type=0, int hdr_len=0, int gso_size=0,
                int csum_start=0, int csum_offset=0) -> bytes:
    """A virtio_net_hdr (10 bytes, host byte order)."""
    cdef vnet_hdr_t h
    cdef uint8_t out[10]
    h.flags, h.gso_type = flags, gso_type
    h.hdr_len, h.gso_size = hdr_len, gso_size
    h.csum_start, h.csum_offset = csum_start, csum_offset
    vnet_build(out, &h)
    return (<char *>out)[:VIRTIO_NET_HDR_LEN]


def parse_vnet_header(const uint8_t[::1] data) -> tuple:
    """(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)."""
    cdef vnet_hdr_t h
    if data.shape[0] != VIRTIO_NET_HDR_LEN:
        raise ValueError("a virtio_net_hdr is 10 bytes")
    vnet_parse(&data[0], &h)
    return (h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset)


def checksum(const uint8_t[::1] data) -> int:
    """The Internet checksum of data (RFC 1071) as a big-endian number: 0 when the
    data includes a correct checksum field."""
    cdef uint16_t c = <uint16_t>~csum_fold(csum_add(&data[0] if data.shape[0] else NULL,
                                                    data.shape[0], 0))
    cdef uint8_t *b = <uint8_t *>&c
    return (b[0] << 8) | b[1]


def complete_checksum(const uint8_t[::1] packet, int csum_start, int csum_offset) -> bytes:
    """Finish a NEEDS_CSUM checksum (the partial sum is in the field)."""
    cdef size_t n = packet.shape[0]
    cdef uint8_t *buf = <uint8_t *>malloc(n if n else 1)
    cdef int r
    if buf == NULL:
        raise MemoryError()
    try:
        if n:
            memcpy(buf, &packet[0], n)
        r = csum_complete(buf, n, <uint16_t>csum_start, <uint16_t>csum_offset)
        if r < 0:
            raise OffloadError(r)
        return (<char *>buf)[:n]
    finally:
        free(buf)


def segment(const uint8_t[::1] vnet_header, const uint8_t[::1] packet, int mtu,
            int max_segments=64, int part=0) -> list:
    """Split a packet read from TUN (after its virtio header) into IP packets of at
    most ``mtu`` bytes, through gso_split with the loop's slot layout.  ``part`` > 0:
    through gso_split_part instead, ``part`` slots a call (as the loop does when a
    super-packet needs more slots than its batch has left), max_segments in all."""
    cdef vnet_hdr_t h
    cdef size_t n = packet.shape[0], stride, k, i, end, first = 0
    cdef uint8_t *pkt
    cdef uint8_t *slots
    cdef uint32_t *lens
    cdef int r, total = 0, width = part if part > 0 else max_segments
    if vnet_header.shape[0] != VIRTIO_NET_HDR_LEN:
        raise ValueError("a virtio_net_hdr is 10 bytes")
    if mtu < 1 or max_segments < 1 or max_segments > 4096:
        raise ValueError("mtu and max_segments must be positive (max_segments <= 4096)")
    vnet_parse(&vnet_header[0], &h)
    stride = _SLOT_OFF + <size_t>mtu + 16            # room after the packet: a guard
    pkt = <uint8_t *>malloc(n if n else 1)
    slots = <uint8_t *>malloc(stride * max_segments)
    lens = <uint32_t *>malloc(sizeof(uint32_t) * max_segments)
    if pkt == NULL or slots == NULL or lens == NULL:
        free(pkt)
        free(slots)
        free(lens)
        raise MemoryError()
    if width > max_segments:
        width = max_segments
    try:
        if n:
            memcpy(pkt, &packet[0], n)
        out = []
        while True:
            memset(slots, _GUARD, stride * max_segments)
            with nogil:
                if part > 0:
                    r = gso_split_part(&h, pkt, n, first, slots, stride, _SLOT_OFF,
                                       <size_t>mtu, width, lens, &total)
                else:
                    r = gso_split(&h, pkt, n, slots, stride, _SLOT_OFF, <size_t>mtu,
                                  max_segments, lens)
            if r < 0:
                for i in range(stride * max_segments):
                    if slots[i] != _GUARD:
                        raise RuntimeError("gso_split wrote although it failed")
                raise OffloadError(r)
            if r > width:
                raise RuntimeError("gso_split_part wrote more segments than slots")
            for k in range(<size_t>r):
                if lens[k] > <uint32_t>mtu:
                    raise RuntimeError("gso_split made a segment longer than max_len")
                out.append((<char *>slots + k * stride + _SLOT_OFF)[:lens[k]])
            # nothing outside [slot + 16, slot + 16 + length) of the used slots
            for k in range(<size_t>max_segments):
                end = _SLOT_OFF + (lens[k] if k < <size_t>r else 0)
                for i in range(stride):
                    if (i < _SLOT_OFF or i >= end) and slots[k * stride + i] != _GUARD:
                        raise RuntimeError(f"gso_split wrote outside segment {k}")
            first += <size_t>r
            if part <= 0 or first >= <size_t>total:
                return out
            if len(out) >= max_segments:
                raise OffloadError(OFL_E_TOO_MANY)
    finally:
        free(pkt)
        free(slots)
        free(lens)


def coalesce(packets, bint uso=False, arena_size=None, uint64_t seed=0x5EED) -> list:
    """Coalesce decrypted IP packets through gro_coalesce: [(virtio header, IP
    packet)] in write order.  ``arena_size`` defaults to what always suffices."""
    cdef Py_ssize_t n = len(packets), i
    cdef size_t total = 0, cap
    cdef uint8_t **bufs = NULL
    cdef uint8_t **ptrs = NULL
    cdef uint32_t *lens = NULL
    cdef uint8_t **out = NULL
    cdef uint32_t *out_len = NULL
    cdef uint8_t *arena = NULL
    cdef gro_state_t *g = NULL
    cdef const uint8_t[::1] view
    cdef int m, k
    if n > GRO_MAX_PACKETS:
        raise ValueError(f"at most {GRO_MAX_PACKETS} packets")
    for p in packets:
        total += len(p)
    cap = total + VIRTIO_NET_HDR_LEN * n if arena_size is None else arena_size
    try:
        bufs = <uint8_t **>calloc(n + 1, sizeof(uint8_t *))
        ptrs = <uint8_t **>malloc(sizeof(uint8_t *) * (n + 1))
        lens = <uint32_t *>malloc(sizeof(uint32_t) * (n + 1))
        out = <uint8_t **>malloc(sizeof(uint8_t *) * (n + 1))
        out_len = <uint32_t *>malloc(sizeof(uint32_t) * (n + 1))
        arena = <uint8_t *>malloc(cap if cap else 1)
        g = <gro_state_t *>malloc(sizeof(gro_state_t))
        if not (bufs and ptrs and lens and out and out_len and arena and g):
            raise MemoryError()
        for i in range(n):
            view = packets[i]
            bufs[i] = <uint8_t *>malloc(_HEADROOM + view.shape[0])
            if bufs[i] == NULL:
                raise MemoryError()
            memset(bufs[i], _GUARD, _HEADROOM)
            if view.shape[0]:
                memcpy(bufs[i] + _HEADROOM, &view[0], view.shape[0])
            ptrs[i] = bufs[i] + _HEADROOM
            lens[i] = <uint32_t>view.shape[0]
        memset(arena, _GUARD, cap)
        gro_init(g, seed)
        with nogil:
            m = gro_coalesce(g, ptrs, lens, <int>n, uso, arena, cap, out, out_len)
        if m < 0:
            raise OffloadError(m)
        result = []
        total = 0
        for k in range(m):
            if out[k] >= arena and out[k] < arena + cap:
                total += out_len[k]
            result.append(((<char *>out[k])[:VIRTIO_NET_HDR_LEN],
                           (<char *>out[k] + VIRTIO_NET_HDR_LEN)[:out_len[k] - VIRTIO_NET_HDR_LEN]))
        for i in range(n):
            if bufs[i][_HEADROOM - VIRTIO_NET_HDR_LEN - 1] != _GUARD:
                raise RuntimeError("gro_coalesce wrote before a packet's headroom")
            view = packets[i]
            if view.shape[0] and memcmp(ptrs[i], &view[0], view.shape[0]) != 0:
                raise RuntimeError("gro_coalesce modified an input packet")
        for i in range(<Py_ssize_t>total, <Py_ssize_t>cap):
            if arena[i] != _GUARD:
                raise RuntimeError("gro_coalesce wrote past what it used of the arena")
        return result
    finally:
        if bufs != NULL:
            for i in range(n):
                free(bufs[i])
        free(bufs)
        free(ptrs)
        free(lens)
        free(out)
        free(out_len)
        free(arena)
        free(g)

