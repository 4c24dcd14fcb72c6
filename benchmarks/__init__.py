"""Benchmark scripts (run as files or `python -m benchmarks.NAME`); `benchmarks.models` builds their models."""
