"""Benchmarks that report every figure next to its floor and a peer measured in the same run."""
