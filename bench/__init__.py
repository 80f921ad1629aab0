"""Benchmarks: micro (pytest-benchmark, `bench/micro/`) and the namespace harness
(`python -m bench`)."""
