"""A bounded FIFO of fixed-size items under a mutex (inline only).  The packet loop's
slow queue and handshake queue are two of these, with their own item types.

The producer fills the item in place between ``_ring_push_begin`` and
``_ring_push_end``, the consumer reads it between ``_ring_pop_begin`` and
``_ring_pop_end``: the ring's lock is held in between, so nothing is copied twice."""
from libc.stdint cimport uint8_t
from libc.stdlib cimport calloc, free
from kubespan_dp._wg_crypto cimport OPENSSL_cleanse
from kubespan_dp._wg_os cimport (pthread_mutex_t, pthread_mutex_init, pthread_mutex_destroy,
                                 pthread_mutex_lock, pthread_mutex_unlock)


cdef struct ring_t:
    pthread_mutex_t lock
    uint8_t *items                   # cap * item_size bytes
    size_t item_size
    int cap
    int head                         # the oldest item
    int count                        # read without the lock only as a hint


cdef inline int _ring_init(ring_t *r, int cap, size_t item_size) noexcept nogil:
    """0, or -1 if out of memory (``_ring_free`` is safe either way)."""
    pthread_mutex_init(&r.lock, NULL)
    r.items = <uint8_t *>calloc(cap, item_size)
    r.item_size = item_size
    r.cap = cap
    r.head = r.count = 0
    return 0 if r.items != NULL else -1


cdef inline void _ring_free(ring_t *r) noexcept nogil:
    if r.items != NULL:
        OPENSSL_cleanse(r.items, r.cap * r.item_size)   # items hold packets
    free(r.items)
    r.items = NULL
    pthread_mutex_destroy(&r.lock)


cdef inline void *_ring_push_begin(ring_t *r) noexcept nogil:
    """Lock and return the free item at the tail; NULL (and unlocked) if full."""
    pthread_mutex_lock(&r.lock)
    if r.count >= r.cap:
        pthread_mutex_unlock(&r.lock)
        return NULL
    return r.items + <size_t>((r.head + r.count) % r.cap) * r.item_size


cdef inline bint _ring_push_end(ring_t *r) noexcept nogil:
    """Publish the item and unlock.  True if the ring was empty: wake the consumer
    (one wakeup per batch of pushes, the consumer drains it all)."""
    cdef bint was_empty = r.count == 0
    r.count += 1
    pthread_mutex_unlock(&r.lock)
    return was_empty


cdef inline void *_ring_pop_begin(ring_t *r) noexcept nogil:
    """Lock and return the oldest item; NULL (and unlocked) if empty."""
    pthread_mutex_lock(&r.lock)
    if r.count == 0:
        pthread_mutex_unlock(&r.lock)
        return NULL
    return r.items + <size_t>r.head * r.item_size


cdef inline void _ring_pop_end(ring_t *r) noexcept nogil:
    """Consume the oldest item and unlock."""
    r.head = (r.head + 1) % r.cap
    r.count -= 1
    pthread_mutex_unlock(&r.lock)
