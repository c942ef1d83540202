"""Builds the optional CUDA extension ``deco_kernels._C`` from csrc/ (see README: building)."""

from setuptools import setup

setup()
