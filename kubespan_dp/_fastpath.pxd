"""What other extensions see of _fastpath: the Keypair type and its C session (the
test-only kubespan_dp._batch seals and opens on it with the loop's functions)."""
from kubespan_dp._wg_keypair cimport keypair_t


cdef class Keypair:
    cdef keypair_t *kp
