"""How the process's C allocator hands back freed memory.

glibc serves an allocation above its mmap threshold (128 KiB, rising to the largest block freed so
far) with a fresh ``mmap`` and unmaps it on ``free``; it also returns the top of its heap to the
system once 128 KiB of it are free. A prefill step allocates and frees its activations (megabytes
each, ~190 MB a step for 32 prompts on the default model), so each step pages all of them in again,
and the kernel zeroes every page: a quarter of a prefill step's time went to ``clear_page``.
Keeping freed memory in the heap makes the next step reuse it; the process's resident memory stays
at its peak instead of falling back between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks above it still get
# their own mapping, and go back to the system when freed
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# free memory at the heap's top kept before any is returned
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
# the environment variables by which a user tunes the same two settings themselves
USER_SETTINGS_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds for this process, unless the user set either through
    glibc's environment variables. Returns whether the thresholds were set (False off glibc)."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or any(name in env for name in USER_SETTINGS_ENV):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not done:
        log.debug("mallopt refused the allocator thresholds")
    return done
