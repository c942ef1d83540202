"""The digest of the CUDA extension's sources, compiled into ``deco_kernels._C`` so that a stale build is caught.

A module built from other ``csrc/`` files than those beside it (an editable install whose sources changed, a
module carried from another checkout) would run kernels the tests never saw; ``deco_kernels._cuda`` refuses
it. Standard library only: ``setup.py`` loads this file by path before the package is importable, and
``CMakeLists.txt`` runs it as a script (``python _source_digest.py CSRC`` prints the digest).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

SOURCE_PATTERNS = ("*.cpp", "*.cu", "*.h")


def source_digest(csrc: Path) -> str:
    """SHA-256 of the lines ``"<name> <SHA-256 of the file's bytes>"`` of csrc's sources, sorted by name."""
    paths = sorted({path for pattern in SOURCE_PATTERNS for path in Path(csrc).glob(pattern)}, key=lambda p: p.name)
    listing = "".join(f"{path.name} {hashlib.sha256(path.read_bytes()).hexdigest()}\n" for path in paths)
    return hashlib.sha256(listing.encode()).hexdigest()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} CSRC_DIRECTORY")
    print(source_digest(Path(sys.argv[1])))
