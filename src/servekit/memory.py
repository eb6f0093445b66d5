"""How the process's C allocator hands memory back to the kernel, for a compute loop.

glibc serves an allocation above its mmap threshold (128 KiB, raised as such blocks are freed) with a
fresh ``mmap`` and returns it with ``munmap`` on free; freed memory at the top of the heap past the
trim threshold goes back to the kernel too. An engine step allocates the same large buffers every
step (projection outputs, the logits, the GEMM's packed panels: a batch-32 step of the default model
makes ~150 of 74 KiB-6 MiB), so each of them page-faults its memory in again, zero-filled by the
kernel, every step: on the AVX2 EPYC ~20% of the CPU time of a batch-32 projection. Raising both
thresholds keeps freed step buffers in the heap for the next step; the process holds on to its
largest step's working set.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): larger blocks, such as
# the logits of a long prompt's every position, still come from mmap and go back when freed.
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 256 * 2**20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def retain_freed_memory() -> bool:
    """Keep freed buffers of up to 32 MiB in the heap (glibc on Linux; elsewhere, or when the user
    tuned the allocator through its environment variables, nothing changes). True when applied."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    applied = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and applied
    if not applied:  # not glibc (musl's mallopt is a stub returning 0)
        logger.debug("mallopt refused the thresholds: freed memory goes back to the kernel")
    return applied
