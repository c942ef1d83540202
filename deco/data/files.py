"""Atomic file writes: readers never see a partly written file, a crash leaves the previous one intact."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["write_bytes_atomically", "write_json_atomically"]


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file in ``path``'s folder (created if missing), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates the file readable by its owner only; give it the mode a plain open() would.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def write_json_atomically(path: str | os.PathLike, payload) -> Path:
    """``payload`` as indented JSON (UTF-8, trailing newline), written atomically."""
    return write_bytes_atomically(path, (json.dumps(payload, indent=1) + "\n").encode())
