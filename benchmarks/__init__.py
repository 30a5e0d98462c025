"""Benchmarks (not tests): ``make bench`` (benchmarks/bench.py), ``make bench-limits`` (benchmarks/run.py)."""
