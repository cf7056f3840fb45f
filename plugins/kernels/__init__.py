"""Triton kernels of the two attention operators."""
