"""How many CPU threads the process computes with, and how its idle OpenMP threads wait.

PyTorch sizes its OpenMP pool by the machine's cores, not by the CPUs this process may run on
(``taskset``, cgroup cpusets, a container's CPU list); and libgomp's threads spin at every barrier
(``OMP_WAIT_POLICY`` unset: ~300k iterations before sleeping). When other processes share the
cores, a spinning thread burns the time slice its partner needs to finish the region, so a decode
step slows far more than the CPU taken. Passive waiting makes idle threads sleep at once.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SPIN_COUNT_ENV = "GOMP_SPINCOUNT"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_passive_wait(environ: MutableMapping[str, str] | None = None) -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user chose how threads wait (a policy, or libgomp's
    own ``GOMP_SPINCOUNT``: a bounded spin is faster on a machine nobody else uses). Only effective
    before libgomp starts (before torch is imported), so ``servekit``'s command calls it first
    thing; processes it starts inherit it."""
    env = os.environ if environ is None else environ
    if SPIN_COUNT_ENV not in env:
        env.setdefault(WAIT_POLICY_ENV, "PASSIVE")


def configure_threads(num_threads: int | None) -> int:
    """Set torch's thread count (``num_threads``, else its default capped at the available CPUs)
    and return it."""
    import torch

    count = num_threads if num_threads is not None else min(torch.get_num_threads(), available_cpus())
    if count != torch.get_num_threads():
        torch.set_num_threads(count)
    return count
