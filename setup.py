"""Build the Cython fast path against the system OpenSSL libcrypto."""
from Cython.Build import cythonize
from setuptools import Extension, setup

fastpath = Extension(
    "kubespan_dp._fastpath",
    sources=["kubespan_dp/_fastpath.pyx"],
    libraries=["crypto"],
    extra_compile_args=["-O3"],
)

setup(ext_modules=cythonize([fastpath], language_level=3))
