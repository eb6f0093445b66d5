"""What this machine's CPU is and has, as ``/proc/cpuinfo`` says: the one place that reads it (the
kernels' build key, the int8 check, the benchmarks' reports)."""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo_line(*prefixes: str) -> str | None:
    """The first ``/proc/cpuinfo`` line starting with one of ``prefixes`` (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(prefixes):
                return line
    except OSError:
        pass
    return None


def cpu_signature() -> str:
    """The CPU's feature-flags line (``-march=native`` code must not run on a CPU lacking them)."""
    return _cpuinfo_line("flags", "Features") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it cannot be read)."""
    line = _cpuinfo_line("flags", "Features")
    return set(line.split(":", 1)[1].split()) if line is not None else set()


def cpu_model() -> str:
    """The CPU's model name, for reports."""
    line = _cpuinfo_line("model name")
    return line.split(":", 1)[1].strip() if line is not None else (platform.processor() or "unknown")
