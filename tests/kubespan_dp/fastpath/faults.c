/* Faults the kernel and libc never produce on demand, for tests/kubespan_dp/fastpath/
   test_loop_faults.py: preloaded (LD_PRELOAD) into a child process that runs a
   PacketLoop (loop_child.py).  Nothing here is linked into the product. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

/* KS_TEST_RECV_BUFFER=N: the loop's receive buffers are 64 KiB, longer than any UDP
   datagram; hand the kernel buffers of N bytes instead, so a longer datagram is
   really truncated (and flagged MSG_TRUNC) by the kernel. */
int recvmmsg(int fd, struct mmsghdr *msgs, unsigned int n, int flags,
             struct timespec *timeout)
{
    static int (*real)(int, struct mmsghdr *, unsigned int, int, struct timespec *);
    const char *limit = getenv("KS_TEST_RECV_BUFFER");
    unsigned int i;
    if (real == NULL)
        real = (int (*)(int, struct mmsghdr *, unsigned int, int, struct timespec *))
            dlsym(RTLD_NEXT, "recvmmsg");
    if (limit != NULL) {
        size_t max = strtoul(limit, NULL, 10);
        for (i = 0; i < n; i++)
            if (msgs[i].msg_hdr.msg_iovlen == 1 && msgs[i].msg_hdr.msg_iov[0].iov_len > max)
                msgs[i].msg_hdr.msg_iov[0].iov_len = max;
    }
    return real(fd, msgs, n, flags, timeout);
}

/* ks_test_fail_calloc(nmemb, size): the next calloc of exactly that shape returns
   NULL (once), as when memory runs out. */
extern void *__libc_calloc(size_t nmemb, size_t size);
static size_t fail_nmemb, fail_size;
static int armed;

void ks_test_fail_calloc(size_t nmemb, size_t size)
{
    fail_nmemb = nmemb;
    fail_size = size;
    __atomic_store_n(&armed, 1, __ATOMIC_SEQ_CST);
}

void *calloc(size_t nmemb, size_t size)
{
    if (__atomic_load_n(&armed, __ATOMIC_SEQ_CST) && nmemb == fail_nmemb
            && size == fail_size && __atomic_exchange_n(&armed, 0, __ATOMIC_SEQ_CST))
        return NULL;
    return __libc_calloc(nmemb, size);
}

/* ks_test_fail_seals(n): the next n encryptions fail in EVP_CipherFinal_ex (after
   the data was encrypted, before the tag exists), as an OpenSSL error would. */
static int seals_to_fail;

void ks_test_fail_seals(int n)
{
    __atomic_store_n(&seals_to_fail, n, __ATOMIC_SEQ_CST);
}

int EVP_CipherFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
{
    static int (*real)(EVP_CIPHER_CTX *, unsigned char *, int *);
    if (real == NULL)
        real = (int (*)(EVP_CIPHER_CTX *, unsigned char *, int *))
            dlsym(RTLD_NEXT, "EVP_CipherFinal_ex");
    if (EVP_CIPHER_CTX_is_encrypting(ctx)
            && __atomic_load_n(&seals_to_fail, __ATOMIC_SEQ_CST) > 0
            && __atomic_sub_fetch(&seals_to_fail, 1, __ATOMIC_SEQ_CST) >= 0)
        return 0;
    return real(ctx, out, outl);
}
