"""Replicas on a local single-node Ray cluster (`--ray-address local`), in a network namespace with
only loopback, so no traffic leaves it (Ray would otherwise advertise the machine's interface)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.e2e.serving import APPS
from tests.e2e.test_serve_tiny import tiny_model

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

__all__ = ["tiny_model"]


def can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_unshare(), reason="needs unshare -n (a network namespace) and ip")
def test_ray_replicas_restart_and_reregister(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    script = f"ip link set lo up && exec {sys.executable} {APPS / 'ray_scenario.py'} {tiny_model} {tmp_path}"
    ray_tmp = tempfile.mkdtemp(prefix="skray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp}
    try:
        result = subprocess.run(
            ["unshare", "-n", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=850
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = tmp_path / "ray-serve.log"
    detail = result.stdout[-3000:] + result.stderr[-3000:] + (log.read_text()[-4000:] if log.exists() else "")
    assert result.returncode == 0, detail
    assert "ray scenario: ok" in result.stdout, detail
