"""Parity reports and throughput benchmarks."""
