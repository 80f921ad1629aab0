"""Lookup tables of the C packet path (inline only): the allowed-IPs binary trie and
the open-addressing index tables (our receiver index -> session)."""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

cdef enum:
    NO_PEER = -1


cdef struct trie_node_t:
    int32_t child[2]
    int32_t peer


cdef inline int32_t _trie_lookup(const trie_node_t *nodes, const uint8_t *addr, int bits,
                                 int32_t root) noexcept nogil:
    cdef int32_t node = root, best = NO_PEER
    cdef int i = 0
    while node >= 0:
        if nodes[node].peer != NO_PEER:
            best = nodes[node].peer
        if i == bits:
            break
        node = nodes[node].child[(addr[i >> 3] >> (7 - (i & 7))) & 1]
        i += 1
    return best


cdef inline int _ix_find(const uint32_t *keys, const void **vals, int cap,
                         uint32_t index) noexcept nogil:
    """Slot of ``index`` in an open-addressing table (``vals[slot]`` non-NULL marks a
    used slot), or -1."""
    cdef uint32_t mask, i
    if cap == 0:
        return -1
    mask = cap - 1
    i = (index * 2654435761u) & mask
    while vals[i] != NULL:
        if keys[i] == index:
            return <int>i
        i = (i + 1) & mask
    return -1
