# cython: boundscheck=False, wraparound=False
"""The C packet path: ChaCha20-Poly1305 on OpenSSL EVP with the GIL released.

This first cut seals and opens single WireGuard transport payloads; the batched
TUN/UDP loop builds on these contexts.
"""
from libc.stdint cimport uint64_t, uint8_t
from libc.string cimport memset

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_CIPHER_CTX
    ctypedef struct EVP_CIPHER
    const EVP_CIPHER *EVP_chacha20_poly1305()
    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, void *impl,
                          const unsigned char *key, const unsigned char *iv, int enc)
    int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                         const unsigned char *inp, int inl)
    int EVP_CipherFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr)
    int EVP_CTRL_AEAD_SET_TAG
    int EVP_CTRL_AEAD_GET_TAG

DEF TAG_LEN = 16


class AuthenticationError(ValueError):
    """The Poly1305 tag did not verify."""


cdef inline void _nonce(uint8_t *out, uint64_t counter) noexcept nogil:
    # WireGuard nonce: 4 zero bytes then the 64-bit counter, little endian.
    cdef int i
    memset(out, 0, 4)
    for i in range(8):
        out[4 + i] = <uint8_t>((counter >> (8 * i)) & 0xFF)


cdef class AEADKey:
    """One direction's ChaCha20-Poly1305 key with its EVP contexts made once."""
    cdef EVP_CIPHER_CTX *_seal
    cdef EVP_CIPHER_CTX *_open

    def __cinit__(self, bytes key not None):
        if len(key) != 32:
            raise ValueError("ChaCha20-Poly1305 key must be 32 bytes")
        self._seal = EVP_CIPHER_CTX_new()
        self._open = EVP_CIPHER_CTX_new()
        if self._seal == NULL or self._open == NULL:
            raise MemoryError()
        if (EVP_CipherInit_ex(self._seal, EVP_chacha20_poly1305(), NULL, <const unsigned char *>key, NULL, 1) != 1
                or EVP_CipherInit_ex(self._open, EVP_chacha20_poly1305(), NULL, <const unsigned char *>key, NULL, 0) != 1):
            raise RuntimeError("EVP_CipherInit_ex failed")

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
        cdef uint8_t nonce[12]
        cdef int outl = 0, ok = 1
        cdef const uint8_t *src = &plaintext[0] if n else <const uint8_t *>b""
        with nogil:
            _nonce(nonce, counter)
            ok &= EVP_CipherInit_ex(self._seal, NULL, NULL, NULL, nonce, 1)
            if n:
                ok &= EVP_CipherUpdate(self._seal, &o[0], &outl, src, <int>n)
            ok &= EVP_CipherFinal_ex(self._seal, &o[0] + n, &outl)
            ok &= EVP_CIPHER_CTX_ctrl(self._seal, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, &o[0] + n)
        if ok != 1:
            raise RuntimeError("ChaCha20-Poly1305 seal failed")
        return bytes(out)

    def open(self, uint64_t counter, const uint8_t[::1] sealed):
        """Return the plaintext, or raise AuthenticationError if the tag is wrong."""
        cdef Py_ssize_t n = sealed.shape[0] - TAG_LEN
        if n < 0:
            raise AuthenticationError("sealed payload shorter than the tag")
        out = bytearray(n)
        cdef uint8_t[::1] o = out
        cdef uint8_t nonce[12]
        cdef uint8_t tag[TAG_LEN]
        cdef uint8_t scratch[1]
        cdef int outl = 0, ok = 1, i
        with nogil:
            for i in range(TAG_LEN):
                tag[i] = sealed[n + i]
            _nonce(nonce, counter)
            ok &= EVP_CipherInit_ex(self._open, NULL, NULL, NULL, nonce, 0)
            if n:
                ok &= EVP_CipherUpdate(self._open, &o[0], &outl, &sealed[0], <int>n)
            ok &= EVP_CIPHER_CTX_ctrl(self._open, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, tag)
            ok &= EVP_CipherFinal_ex(self._open, scratch, &outl) if n == 0 else EVP_CipherFinal_ex(self._open, &o[0] + n, &outl)
        if ok != 1:
            raise AuthenticationError("ChaCha20-Poly1305 tag mismatch")
        return bytes(out)
