"""The environment for tests that start Python in a subprocess: the checkout under test comes first.

A child process imports deco_kernels / deco / benchmarks from its sys.path, which need not hold the checkout the
tests run from (an editable install of another checkout, a script run from tests/): prepending the repository
root makes every child test this tree.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def repo_environment(**overrides: str) -> dict[str, str]:
    """os.environ with the repository root first on PYTHONPATH, then ``overrides``."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **overrides}
