"""Benchmarks: print ratios against a baseline measured in the same process."""
