"""Benchmarks of deco_kernels (per-op microbenchmarks) and of whole DECO / DETR training and inference steps."""
