"""The digest of the CUDA extension's sources, compiled into ``deco_kernels._C`` so that a stale build is caught.

A module built from other ``csrc/`` files than those beside it (an editable install whose sources changed, a
module carried from another checkout) would run kernels the tests never saw; ``deco_kernels._cuda`` refuses
it. Standard library only: ``setup.py`` loads this file by path before the package is importable, and
``CMakeLists.txt`` runs it as a script (``python _source_digest.py CSRC`` prints the digest).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

SOURCE_PATTERNS = ("*.cpp", "*.cu", "*.h")


def files_digest(paths: Iterable[Path], name: Callable[[Path], str]) -> str:
    """SHA-256 of the lines ``"<name(path)> <SHA-256 of the file's bytes>"`` of ``paths``, sorted by name."""
    listing = "".join(
        f"{name(path)} {hashlib.sha256(path.read_bytes()).hexdigest()}\n" for path in sorted(paths, key=name)
    )
    return hashlib.sha256(listing.encode()).hexdigest()


def source_digest(csrc: Path) -> str:
    """:func:`files_digest` of csrc's sources, named by file name."""
    return files_digest({path for pattern in SOURCE_PATTERNS for path in Path(csrc).glob(pattern)}, lambda p: p.name)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} CSRC_DIRECTORY")
    print(source_digest(Path(sys.argv[1])))
