"""Benchmark studies of crossvit-fast (design.md §5); see bench/README.md.

``python -m bench.kernels``: the three fused ops against the naive reference, eager and compiled.
``python -m bench.e2e``: whole-model images/s against timm, eager and compiled.
"""
