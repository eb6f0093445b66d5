"""The C kernels built outside their loader for A/B benchmarks: from this tree or a git revision, with
extra compiler flags (e.g. ``-mno-avx512f`` for the AVX2 path), into a library of the caller's own."""

from __future__ import annotations

import ctypes
import subprocess
from collections.abc import Iterable
from pathlib import Path

from servekit.llm import kernels

KERNELS = "src/servekit/llm/kernels"


def kernel_sources(ref: str | None = None) -> dict[str, str]:
    """The kernels' C sources and headers (file name: text), of this tree or of git revision ``ref``."""
    if ref is None:
        return {path.name: path.read_text() for path in (*kernels.SOURCES, *kernels.HEADERS)}
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{ref}:{KERNELS}"], check=True, capture_output=True, text=True
    ).stdout.split()
    return {
        name: subprocess.run(
            ["git", "show", f"{ref}:{KERNELS}/{name}"], check=True, capture_output=True, text=True
        ).stdout
        for name in names
        if name.endswith((".c", ".h"))
    }


def build_library(
    sources: dict[str, str], target: Path, functions: Iterable[str], extra: tuple[str, ...] = ()
) -> ctypes.CDLL:
    """``sources`` (file name: text) compiled as the loader compiles them, plus ``extra`` flags, into
    ``target``; ``functions`` get the loader's signatures (all return ``int``)."""
    compiler = kernels._compiler()
    if compiler is None:
        raise SystemExit("no C compiler")
    folder = target.parent / target.stem
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in sources.items():
        (folder / name).write_text(text)
    c_files = sorted(str(folder / name) for name in sources if name.endswith(".c"))
    command = [compiler, *kernels.FLAGS, *extra, *kernels.OPENMP_FLAGS, "-o", str(target), *c_files, "-lm"]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    library = ctypes.CDLL(str(target))
    for name in functions:
        function = getattr(library, name)
        function.argtypes = kernels._SIGNATURES[name]
        function.restype = ctypes.c_int
    return library
