"""ChaCha20-Poly1305 on OpenSSL EVP for the C packet path: THE seal and open of one
payload in place, nonces, little-endian fields and padding (inline only)."""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from kubespan_dp._wg_defs cimport *

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

cdef extern from "openssl/crypto.h" nogil:
    void OPENSSL_cleanse(void *ptr, size_t len)


cdef inline void _nonce(uint8_t *out, uint64_t counter) noexcept nogil:
    # WireGuard nonce: 4 zero bytes then the 64-bit counter, little endian.
    cdef int i
    memset(out, 0, 4)
    for i in range(8):
        out[4 + i] = <uint8_t>((counter >> (8 * i)) & 0xFF)


cdef inline void _put_le32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline uint32_t _get_le32(const uint8_t *p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void _put_le64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = (v >> (8 * i)) & 0xFF


cdef inline uint64_t _get_le64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v |= (<uint64_t>p[i]) << (8 * i)
    return v


cdef inline Py_ssize_t _padded_len(Py_ssize_t n, Py_ssize_t mtu) noexcept nogil:
    # wireguard-go calculatePaddingSize: round up to 16, never beyond the MTU.
    cdef Py_ssize_t last = n
    cdef Py_ssize_t padded
    if mtu == 0:
        return (n + PAD_MULTIPLE - 1) & ~(PAD_MULTIPLE - 1)
    if last > mtu:
        last = last % mtu
    padded = (last + PAD_MULTIPLE - 1) & ~(PAD_MULTIPLE - 1)
    if padded > mtu:
        padded = mtu
    return n + (padded - last)


cdef inline int _seal_one(EVP_CIPHER_CTX *ctx, uint64_t counter, uint8_t *data,
                          int n) noexcept nogil:
    """Encrypt data[0:n] in place and write the tag at data[n]. 1 on success."""
    cdef uint8_t nonce[12]
    cdef int outl = 0, ok = 1
    _nonce(nonce, counter)
    ok &= EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 1)
    if n:
        ok &= EVP_CipherUpdate(ctx, data, &outl, data, n)
    ok &= EVP_CipherFinal_ex(ctx, data + n, &outl)
    ok &= EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, data + n)
    return ok


cdef inline int _open_one(EVP_CIPHER_CTX *ctx, uint64_t counter, uint8_t *data,
                          int n) noexcept nogil:
    """Decrypt data[0:n] in place, verifying the tag at data[n]. 1 if authentic."""
    cdef uint8_t nonce[12]
    cdef uint8_t scratch[16]
    cdef int outl = 0, ok = 1
    _nonce(nonce, counter)
    ok &= EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 0)
    if n:
        ok &= EVP_CipherUpdate(ctx, data, &outl, data, n)
    ok &= EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, data + n)
    ok &= EVP_CipherFinal_ex(ctx, scratch, &outl) > 0
    return ok


cdef inline EVP_CIPHER_CTX *_new_ctx(const uint8_t *key, int enc) except NULL:
    cdef EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new()
    if ctx == NULL:
        raise MemoryError()
    if EVP_CipherInit_ex(ctx, EVP_chacha20_poly1305(), NULL, key, NULL, enc) != 1:
        EVP_CIPHER_CTX_free(ctx)
        raise RuntimeError("EVP_CipherInit_ex failed")
    return ctx
