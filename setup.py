"""Build the Cython fast path against the system OpenSSL libcrypto."""

from Cython.Build import cythonize
from setuptools import Extension, setup

fastpath = Extension(
    "kubespan_dp._fastpath",
    sources=["kubespan_dp/_fastpath.pyx"],
    libraries=["crypto"],
    # _GNU_SOURCE for recvmmsg/sendmmsg; -march is left generic so the wheel runs
    # anywhere (OpenSSL picks its own SIMD code at run time, which is where the
    # time goes).
    define_macros=[("_GNU_SOURCE", "1")],
    extra_compile_args=["-O3"],
)

setup(ext_modules=cythonize([fastpath], language_level=3))
