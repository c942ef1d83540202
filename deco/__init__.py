"""DECO: the query-based, NMS-free, pure-convolution object detector, built on ``deco_kernels``."""

__version__ = "0.1.0"
