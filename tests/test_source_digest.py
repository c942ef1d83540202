"""The source digest that ties deco_kernels._C to the csrc/ it was built from, and the refusal of a stale module."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from deco_kernels import _cuda
from deco_kernels._source_digest import source_digest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def csrc(tmp_path):
    directory = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", directory)
    return directory


def test_digest_is_that_of_the_file_listing(csrc):
    names = sorted(p.name for p in csrc.iterdir() if p.suffix in (".cpp", ".cu", ".h"))
    assert {"bindings.cpp", "kernels.cu", "kernel_math.h"} <= set(names)
    listing = "".join(f"{name} {hashlib.sha256((csrc / name).read_bytes()).hexdigest()}\n" for name in names)
    assert source_digest(csrc) == hashlib.sha256(listing.encode()).hexdigest()
    assert source_digest(csrc) == source_digest(ROOT / "csrc")


@pytest.mark.parametrize("change", ["edit a header", "edit a kernel", "add a source", "remove a source", "rename"])
def test_digest_changes_with_any_source(csrc, change):
    before = source_digest(csrc)
    if change == "edit a header":
        (csrc / "kernel_math.h").write_text((csrc / "kernel_math.h").read_text() + "\n")
    elif change == "edit a kernel":
        text = (csrc / "kernels.cu").read_text()
        (csrc / "kernels.cu").write_text(text.replace("kElementThreads = 256", "kElementThreads = 128"))
    elif change == "add a source":
        (csrc / "extra.cu").write_text("// new\n")
    elif change == "remove a source":
        (csrc / "cpu_kernels.cpp").unlink()
    else:
        (csrc / "ops.h").rename(csrc / "ops2.h")
    assert source_digest(csrc) != before


def test_digest_ignores_other_files(csrc):
    before = source_digest(csrc)
    (csrc / "notes.txt").write_text("not compiled")
    (csrc / "sub").mkdir()
    (csrc / "sub" / "nested.cu").write_text("// not compiled: setup.py takes csrc/*.cu only")
    assert source_digest(csrc) == before


def test_digest_script_prints_the_digest(csrc):
    result = subprocess.run(
        [sys.executable, str(ROOT / "deco_kernels" / "_source_digest.py"), str(csrc)],
        check=True, capture_output=True, text=True,
    )
    assert result.stdout.strip() == source_digest(csrc)


def test_a_module_from_these_sources_is_accepted():
    module = types.SimpleNamespace(__file__="/x/_C.so", source_digest=source_digest(ROOT / "csrc"))
    assert _cuda._stale_build_error(module) is None


@pytest.mark.parametrize("digest", ["0" * 64, None])
def test_a_stale_module_is_refused_with_the_reason(digest):
    module = types.SimpleNamespace(__file__="/x/_C.so")
    if digest is not None:
        module.source_digest = digest
    error = _cuda._stale_build_error(module)
    assert isinstance(error, _cuda.StaleBuildError)
    message = str(error)
    assert "/x/_C.so is out of date" in message and str(ROOT / "csrc") in message
    assert ("000000000000" if digest else "is missing") in message
    assert source_digest(ROOT / "csrc")[:12] in message


def test_auto_says_why_a_stale_module_is_passed_over(monkeypatch, caplog):
    """On a GPU, "auto" would silently lose the CUDA kernels to a stale build: it warns, naming the module."""
    from deco_kernels import backend

    stale = _cuda.StaleBuildError("/x/_C.so is out of date: it was built from other sources")
    monkeypatch.setattr(_cuda, "_load", lambda: stale)
    monkeypatch.setattr(backend, "_resolved", {})
    with caplog.at_level("INFO", logger="deco_kernels"):
        chosen = backend.resolve_backend("cuda", "auto", op="depthwise_conv2d")
    assert chosen != "cuda" and _cuda.is_stale() and not _cuda.is_available()
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert "CUDA extension is not available: /x/_C.so is out of date" in record.getMessage()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run depthwise_conv2d"):
        backend.resolve_backend("cuda", "cuda", op="depthwise_conv2d")
