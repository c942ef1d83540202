"""Triton kernels and their launchers (the "triton" backend's primitives; no autograd here)."""
