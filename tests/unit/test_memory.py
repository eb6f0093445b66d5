"""Freed step buffers stay in the heap (``servekit.memory``): a buffer allocated, written and freed
again and again page-faults its memory in once, not on every allocation."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")

# In a fresh process: glibc's default 128 KiB mmap threshold, fixed (no dynamic raise), then the page
# faults of 20 rounds of malloc + memset + free of 4 MiB, before and after retain_freed_memory().
SCRIPT = """
import ctypes, resource
from servekit.memory import M_MMAP_THRESHOLD, retain_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
assert libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1

def faults(rounds=20, size=4 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        pointer = libc.malloc(size)
        libc.memset(pointer, 1, size)
        libc.free(pointer)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
applied = retain_freed_memory()
faults(1)  # the first round brings the pages in
print(default, applied, faults())
"""


def run(env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**env, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_freed_buffers_are_not_faulted_in_again() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    default, applied, retained = run(env)
    pages = 20 * (4 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert int(default) >= pages // 2  # the measurement sees the faults of mmap'd buffers
    assert applied == "True"
    assert int(retained) < pages // 50


def test_the_users_allocator_settings_win() -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    _, applied, _ = run(env)
    assert applied == "False"
