"""The 8-bit-activation kernels (``q8_rows.c``, quantization=int8's batch-1 rows) against a reference
integer dot in numpy, on every path the CPUs get (this CPU's build, AVX2 without VNNI, no AVX2)."""

from __future__ import annotations

import ctypes
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from servekit.llm.kernels import _SIGNATURES, SOURCES, kernels_available
from servekit.llm.kernels.quantized import BLOCK_TYPES, Q8_TYPES, q8_matmul, quantized_matmul
from tests.llm.test_quantized_kernels import random_blocks

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not kernels_available(torch.float32), reason="no C compiler")
Q = gguf.GGMLQuantizationType
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0]


def reference(x: np.ndarray, blocks: np.ndarray, qtype: Any) -> np.ndarray:
    """x's 32-blocks as int8 (d = max|x| / 127, q = rint(x / d)), integer dots with the weight codes,
    d_w d_x <q_w, q_x> + c_w d_x sum(q_x) per block, summed in float64."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    qx = np.rint(xb * inverse).astype(np.int64)
    dx = (amax / np.float32(127)).astype(np.float64)[..., 0]
    n = blocks.shape[0]
    raw = blocks.reshape(n, k // 32, BLOCK_TYPES[int(qtype)][1])
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if qtype == Q.Q8_0:
        codes = raw[..., 2:].view(np.int8).astype(np.int64)
        c = np.zeros_like(d)
    else:
        nibbles = raw[..., -16:]
        codes = np.concatenate([nibbles & 15, nibbles >> 4], axis=2).astype(np.int64)
        c = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64) if qtype == Q.Q4_1 else -8 * d
    dots = np.einsum("mbi,nbi->mnb", qx, codes).astype(np.float64)
    sums = qx.sum(axis=2) * dx  # [m, blocks]
    return np.einsum("mnb,nb,mb->mn", dots, d, dx) + np.einsum("nb,mb->mn", c, sums)


def inputs(qtype: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    blocks = torch.from_numpy(random_blocks(qtype, 70, 160, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    # 7 rows: one group of four x rows and a group of three (q8_rows.c's Q8_GROUP), of varied scales.
    x = torch.randn((7, 160), generator=generator) * torch.tensor(
        [[0.01], [1.0], [30.0], [0.3], [3.0], [1.0], [9.0]]
    )
    x[1, 32:64] = 0.0  # an all-zero block: scale 0
    return x, blocks, torch.randn(70, generator=generator)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_q8_matmul_is_the_integer_dot(qtype: Any) -> None:
    x, blocks, bias = inputs(qtype)
    got = q8_matmul(x, blocks, int(qtype), bias)
    want = reference(x.numpy(), blocks.numpy(), qtype) + bias.numpy()
    scale = np.abs(want).max(axis=1, keepdims=True)
    assert (np.abs(got.numpy() - want).max(axis=1, keepdims=True) / scale).max() < 1e-5  # each row's own
    exact = quantized_matmul(x, blocks, int(qtype), bias)
    error = ((got - exact).norm(dim=1) / exact.norm(dim=1)).max().item()
    assert 0 < error < 0.02  # 8-bit activations: close to the exact product, not equal to it


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_q8_matmul_gives_a_row_the_same_numbers_in_any_group(qtype: Any) -> None:
    """x rows run in groups (2, 3 or 4 against each weight row) or alone: a row's result is the same."""
    x, blocks, bias = inputs(qtype, seed=1)
    alone = torch.cat([q8_matmul(x[i : i + 1], blocks, int(qtype), bias) for i in range(x.shape[0])])
    for rows in (2, 3, 4, 5, 7):
        torch.testing.assert_close(
            q8_matmul(x[:rows], blocks, int(qtype), bias), alone[:rows], rtol=0, atol=0
        )


def _library(tmp_path: Path, march: str) -> ctypes.CDLL:
    from servekit.llm.kernels import _compiler

    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    target = tmp_path / f"{march}.so"
    command = [compiler, "-O2", f"-march={march}", "-ffast-math", "-fPIC", "-shared", "-pthread", "-fopenmp"]
    subprocess.run(
        [*command, "-o", str(target), *map(str, SOURCES), "-lm"], check=True, capture_output=True, timeout=300
    )
    library = ctypes.CDLL(str(target))
    library.q8_matmul.argtypes = _SIGNATURES["q8_matmul"]
    library.q8_matmul.restype = ctypes.c_int
    return library


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 target flags")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2-no-vnni", "no-avx2"])
def test_q8_matmul_on_the_other_cpus_paths(tmp_path: Path, march: str) -> None:
    """AVX2 + FMA without VNNI (the AMD EPYC's: pmaddubsw) and the portable loop give this CPU's numbers."""
    library = _library(tmp_path, march)
    for qtype in TYPES:
        x, blocks, bias = inputs(qtype, seed=3)
        out = torch.empty((x.shape[0], blocks.shape[0]))
        arguments = (x.data_ptr(), x.shape[0], 160, blocks.data_ptr(), 70, blocks.shape[1], int(qtype))
        assert library.q8_matmul(*arguments, bias.data_ptr(), out.data_ptr(), 2) == 0
        torch.testing.assert_close(out, q8_matmul(x, blocks, int(qtype), bias), rtol=1e-5, atol=1e-5)


def test_q8_matmul_refuses_what_it_cannot_run() -> None:
    x, blocks, _ = inputs(Q.Q4_1)
    assert set(Q8_TYPES) == {int(t) for t in TYPES}
    with pytest.raises(ValueError, match="8-bit-activation"):
        q8_matmul(x, blocks, int(Q.Q4_K))
    with pytest.raises(ValueError):
        q8_matmul(x[:, :128], blocks, int(Q.Q4_1))
