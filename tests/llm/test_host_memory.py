"""The allocator keeps the memory a step freed for the next step (servekit.host_memory): without it,
the GEMM's per-thread scratch is mapped and zeroed by the kernel again on every call."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from servekit.host_memory import USER_SETTINGS_ENV, keep_freed_memory
from servekit.llm.kernels import kernels_available

ROOT = Path(__file__).resolve().parents[2]

# Steps of prefill-sized GEMMs on Q6_K blocks (dequantised into per-thread scratch) at 2 threads;
# prints the page faults of the last 18 steps.
STEPS = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, torch
    torch.set_num_threads(2)
    from servekit.host_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    import gguf
    from servekit.llm.kernels.quantized_gemm import quantized_gemm
    from tests.llm.test_quantized_kernels import random_blocks
    q6 = int(gguf.GGMLQuantizationType.Q6_K)
    up = torch.from_numpy(random_blocks(q6, 1536, 512))
    down = torch.from_numpy(random_blocks(q6, 512, 1536, seed=1))

    def step(rows):
        x = torch.randn(rows, 512)
        for _ in range(4):
            x = x + quantized_gemm(torch.nn.functional.silu(quantized_gemm(x, up, q6)), down, q6)

    sizes = [300, 200, 256, 280, 240, 256]
    for rows in sizes:
        step(rows)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for rows in sizes * 3:
        step(rows)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _step_faults(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", STEPS, mode], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.skipif(not kernels_available(torch.float32), reason="no C compiler")
def test_steps_reuse_freed_memory() -> None:
    pytest.importorskip("gguf")
    default, kept = _step_faults("default"), _step_faults("keep")
    # (4 KiB pages: a step's scratch is megabytes, so steps that map it afresh fault thousands of
    # times; a thread that moves to another arena may still grow it once)
    assert 8 * kept < default, f"{kept} page faults in 18 steps with the memory kept, {default} without"


@pytest.mark.parametrize("name", USER_SETTINGS_ENV)
def test_a_users_allocator_settings_are_left_alone(name: str) -> None:
    assert keep_freed_memory({name: "131072"}) is False
