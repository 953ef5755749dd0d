"""Benchmarks of unitsface_kernels: ``python -m benchmarks`` (see benchmarks/README.md)."""
