"""Triton kernels for crossvit-fast (importable as ``crossvit_fast.kernels``)."""
