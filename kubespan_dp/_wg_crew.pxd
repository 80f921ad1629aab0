"""Crypto lanes (inline only): helper threads that run the cipher on a share of one
batch's packets while the loop thread runs the rest, so one direction's crypto is
not bound to one CPU.

Work sharing, not hand-off: the loop thread publishes a job (items to seal or open)
and works through it itself, claiming CREW_CHUNK items at a time; helpers woken for
it claim chunks the same way.  The loop thread never waits for a helper that has not
started, only for chunks a helper has claimed and not finished, so a starved helper
costs a wakeup, never a stall.  Everything around the cipher (counters, replay
window, routing, stats, sends, TUN writes) stays on the loop thread, in order.

A job's keypairs stay alive throughout: the loop thread holds the loop's read lock
until the job is done.  Each lane has its own EVP contexts of a keypair
(keypair_t.seal_ctx[lane] / open_ctx[lane]); lane 0 is the loop thread's.
"""
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from kubespan_dp._wg_defs cimport *
from kubespan_dp._wg_keypair cimport *
from kubespan_dp._wg_os cimport *

cdef extern from *:
    """
    static inline uint64_t ks_load_acq64(uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void ks_store_rel64(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline int ks_cas64(uint64_t *p, uint64_t expected, uint64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL,
                                           __ATOMIC_ACQUIRE);
    }
    static inline uint32_t ks_load_acq32(uint32_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void ks_add_rel32(uint32_t *p, uint32_t v) {
        __atomic_add_fetch(p, v, __ATOMIC_RELEASE);
    }
    static inline void ks_store32(uint32_t *p, uint32_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
    }
    static inline uint32_t ks_load32(uint32_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    """
    uint64_t ks_load_acq64(uint64_t *p) nogil
    void ks_store_rel64(uint64_t *p, uint64_t v) nogil
    bint ks_cas64(uint64_t *p, uint64_t expected, uint64_t desired) nogil
    uint32_t ks_load_acq32(uint32_t *p) nogil
    void ks_add_rel32(uint32_t *p, uint32_t v) nogil
    void ks_store32(uint32_t *p, uint32_t v) nogil
    uint32_t ks_load32(uint32_t *p) nogil


cdef enum:
    CREW_SEAL = 1
    CREW_OPEN = 2
    CREW_CHUNK = 4              # items a thread claims at a time (~3 us of cipher)
    # A smaller job runs on the loop thread alone: one TSO super-packet (~67 KB
    # sealed) or less means no backlog, and a helper's wakeup would cost more CPU
    # than it saves; more than that waiting is where a second CPU pays off.
    CREW_MIN_BYTES = 98304


cdef struct crew_item_t:
    keypair_t *kp
    uint8_t *slot               # a prepared message (seal) or a checked one (open)
    uint32_t length             # its whole length (header + payload + tag)
    uint8_t status              # ST_* once the job is done


cdef struct crew_t:
    int lanes                   # threads per job, the loop thread included (1: alone)
    pthread_mutex_t mu
    pthread_cond_t cv
    uint32_t gen                # the current job (written under mu)
    bint quit                   # helpers leave (under mu)
    # the job; stable from its publication until every item is done
    int kind
    crew_item_t *items
    uint32_t n
    uint64_t claim              # gen << 32 | the next unclaimed item
    uint32_t done               # items finished
    uint64_t helped             # items the helpers ran (statistics)


cdef inline void _crew_one(int kind, crew_item_t *it, int lane) noexcept nogil:
    if kind == CREW_SEAL:
        if it.kp.seal_ctx[lane] == NULL:
            it.status = ST_SEAL_FAILED         # a keypair made for fewer lanes
        else:
            it.status = _seal_crypt(it.kp, lane, it.slot, it.length)
    elif it.kp.open_ctx[lane] == NULL:
        it.status = ST_BAD_TAG
    else:
        it.status = _open_crypt(it.kp, lane, it.slot, it.length)


cdef inline void _crew_work(crew_t *c, uint32_t gen, int lane) noexcept nogil:
    # Claim and run chunks of job ``gen`` until none is left (or another job began).
    cdef uint64_t v
    cdef uint32_t i, k, j, n
    while True:
        v = ks_load_acq64(&c.claim)
        if <uint32_t>(v >> 32) != gen:
            return
        i = <uint32_t>v
        n = ks_load32(&c.n)    # may already be the next job's: then the CAS fails
        if i >= n:
            return
        k = n - i if n - i < CREW_CHUNK else CREW_CHUNK
        if not ks_cas64(&c.claim, v, v + k):
            continue
        # claimed: the job cannot change before these k items are done
        for j in range(i, i + k):
            _crew_one(c.kind, &c.items[j], lane)
        if lane:
            KS_ATOMIC_ADD64(&c.helped, k)
        ks_add_rel32(&c.done, k)


cdef inline void _crew_run(crew_t *c, int kind, crew_item_t *items, uint32_t n,
                           size_t nbytes) noexcept nogil:
    """Run the cipher on items[0:n] (the loop thread, lane 0); returns when all are
    done, each with its status."""
    cdef uint32_t i
    if c.lanes <= 1 or n < 2 or nbytes < CREW_MIN_BYTES:
        for i in range(n):
            _crew_one(kind, &items[i], 0)
        return
    c.kind = kind
    c.items = items
    ks_store32(&c.n, n)
    ks_store32(&c.done, 0)
    pthread_mutex_lock(&c.mu)
    c.gen += 1
    ks_store_rel64(&c.claim, <uint64_t>c.gen << 32)
    pthread_cond_broadcast(&c.cv)
    pthread_mutex_unlock(&c.mu)
    _crew_work(c, c.gen, 0)
    while ks_load_acq32(&c.done) < n:
        sched_yield()          # a helper finishes its last chunk


cdef inline void _crew_helper(crew_t *c, int lane) noexcept nogil:
    """A helper thread's life: run its share of each job until quit."""
    cdef uint32_t seen
    pthread_mutex_lock(&c.mu)
    seen = c.gen
    while not c.quit:
        if c.gen == seen:
            pthread_cond_wait(&c.cv, &c.mu)
            continue
        seen = c.gen
        pthread_mutex_unlock(&c.mu)
        _crew_work(c, seen, lane)
        pthread_mutex_lock(&c.mu)
    pthread_mutex_unlock(&c.mu)


cdef inline void _crew_init(crew_t *c, int lanes) noexcept nogil:
    c.lanes = lanes
    c.quit = False
    pthread_mutex_init(&c.mu, NULL)
    pthread_cond_init(&c.cv, NULL)


cdef inline void _crew_quit(crew_t *c, bint quit) noexcept nogil:
    # quit: wake every helper to leave; not quit: ready for new helpers
    pthread_mutex_lock(&c.mu)
    c.quit = quit
    pthread_cond_broadcast(&c.cv)
    pthread_mutex_unlock(&c.mu)


cdef inline void _crew_destroy(crew_t *c) noexcept nogil:
    pthread_mutex_destroy(&c.mu)
    pthread_cond_destroy(&c.cv)
