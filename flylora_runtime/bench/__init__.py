"""Benchmarks (``python -m flylora_runtime.bench.kernels``)."""
