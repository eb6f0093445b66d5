"""Thread count from the CPUs this process may use, and OpenMP's passive wait set before torch starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from servekit.threads import SPIN_COUNT_ENV, WAIT_POLICY_ENV, available_cpus, default_passive_wait

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_passive_wait_is_a_default_the_user_can_override() -> None:
    env: dict[str, str] = {}
    default_passive_wait(env)
    assert env[WAIT_POLICY_ENV] == "PASSIVE"
    env = {WAIT_POLICY_ENV: "ACTIVE"}
    default_passive_wait(env)
    assert env[WAIT_POLICY_ENV] == "ACTIVE"
    env = {SPIN_COUNT_ENV: "3000"}  # a bounded spin chosen by the user: no policy forced over it
    default_passive_wait(env)
    assert WAIT_POLICY_ENV not in env


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_thread_count_follows_the_affinity_mask() -> None:
    """A process allowed one CPU computes with one thread, whatever torch would pick."""
    assert available_cpus() == len(os.sched_getaffinity(0))
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from servekit.threads import configure_threads; print(configure_threads(None))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = SRC
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_the_servekit_command_sets_passive_wait_before_torch() -> None:
    code = (
        "import os, sys; from servekit import cli; cli.main(['models']); "
        "print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in (WAIT_POLICY_ENV, SPIN_COUNT_ENV)}
    env["PYTHONPATH"] = SRC
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE"
