"""Helpers shared by the test suites and the benchmarks (real processes, real sockets)."""
