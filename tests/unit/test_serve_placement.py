"""Where `servekit serve` puts its workers for --device / --workers / --tp, and that an absent GPU
fails at start with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from servekit.specs.llm.placement import Placement, PlacementError, place_workers


def test_cpu_and_auto_without_gpus_run_every_worker_on_the_cpu() -> None:
    assert place_workers("cpu", 3, 1, gpu_count=4) == Placement("cpu", 1, 3, False)
    assert place_workers("auto", 2, 2, gpu_count=0) == Placement("cpu", 1, 2, False)
    assert place_workers("mps", 1, 1, gpu_count=0) == Placement("mps", 1, 1, False)


def test_one_worker_per_gpu() -> None:
    assert place_workers("auto", 1, 1, gpu_count=4) == Placement("cuda", [0], 1, True)
    assert place_workers("cuda", 4, 1, gpu_count=4) == Placement("cuda", [0, 1, 2, 3], 1, True)
    assert place_workers("cuda", 8, 1, gpu_count=4) == Placement("cuda", "auto", 2, True)
    assert place_workers("cuda:2", 2, 1, gpu_count=4) == Placement("cuda", [2], 2, True)
    with pytest.raises(PlacementError, match="does not spread evenly over 4 GPUs"):
        place_workers("cuda", 6, 1, gpu_count=4)


def test_tensor_parallel_on_cuda_is_one_worker_seeing_every_gpu() -> None:
    assert place_workers("cuda", 1, 2, gpu_count=2) == Placement("cpu", 1, 1, False)
    with pytest.raises(PlacementError, match="one worker drives the tensor-parallel GPUs"):
        place_workers("cuda", 2, 2, gpu_count=4)


def test_cuda_without_a_gpu_fails_at_start() -> None:
    with pytest.raises(PlacementError, match="no CUDA GPU is visible here: use --device cpu or auto"):
        place_workers("cuda", 1, 1, gpu_count=0)
    with pytest.raises(PlacementError, match=r"only 2 CUDA GPU\(s\) are visible"):
        place_workers("cuda:3", 1, 1, gpu_count=2)


def test_serve_device_cuda_exits_with_the_reason_here() -> None:
    if os.path.isdir("/proc/driver/nvidia/gpus"):
        pytest.skip("this machine has a CUDA GPU")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "servekit.cli", "serve", "--device", "cuda", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2
    assert "--device cuda but no CUDA GPU is visible here" in result.stderr
