"""Benchmarks (not tests): ``python -m benchmarks.run`` / ``make bench``."""
