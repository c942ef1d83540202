"""Loads the compiled extension ``deco_kernels._C`` (csrc/) when it was built."""

from __future__ import annotations

import functools


@functools.cache
def _load():
    try:
        from deco_kernels import _C  # noqa: F401  (importing registers the torch.ops.deco_kernels_C ops)
    except ImportError as error:
        return error
    return None


def is_available() -> bool:
    """True when ``deco_kernels._C`` was built and imports."""
    return _load() is None


def load_error() -> str | None:
    """Why the extension is not available, or None."""
    error = _load()
    return None if error is None else str(error)
