"""The prefill GEMM on GGUF's quantised blocks (``quantized_gemm.c``) against ``gguf``'s own
dequantisation (float64 reference): every block type, shapes off every tile edge, the vector path of
this CPU and the generic one, and the dispatch of the quantised projections by row count."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from servekit.cpu import cpu_flags
from servekit.llm import kernels
from servekit.llm.kernels import kernels_available, quantized, quantized_gemm
from servekit.llm.kernels.quantized import GGML_F32, QuantizedTensor, quantized_matmul
from servekit.llm.kernels.quantized_gemm import quantized_gemm_lanes
from servekit.llm.models.quantized_linear import GEMM_FROM_ROWS, QuantizedLinear
from tests.llm.test_quantized_kernels import TYPES, _build, cols_for, random_blocks

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not kernels_available(torch.float32), reason="no C compiler")
Q = gguf.GGMLQuantizationType


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)  # the threaded split of weight-row groups is exercised


def relative_error(got: torch.Tensor, reference: np.ndarray) -> float:
    return float(np.abs(got.double().numpy() - reference).max() / np.abs(reference).max())


def check(qtype: Any, rows: int, out_rows: int, cols: int, *, bias: bool, seed: int = 0) -> None:
    blocks = random_blocks(qtype, out_rows, cols, seed=seed)
    weight = gguf.quants.dequantize(blocks, qtype).astype(np.float64)
    b = torch.randn(out_rows) if bias else None
    x = torch.randn(rows, cols)
    reference = x.double().numpy() @ weight.T + (0 if b is None else b.double().numpy())
    got = quantized_gemm.quantized_gemm(x, torch.from_numpy(blocks), int(qtype), b)
    assert got.shape == (rows, out_rows) and got.dtype == torch.float32
    assert relative_error(got, reference) < 1e-5, (qtype, rows, out_rows, cols)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 24, 25, 33, 128])
def test_gemm_matches_float64_reference(qtype: Any, rows: int) -> None:
    # 37 weight rows: not a multiple of the micro-kernel's 6 or 12 columns nor of a row group.
    # 24 and 25 rows: a last panel of one vector of rows (half a panel: its own kernel) and of one more.
    check(qtype, rows, 37, cols_for(qtype), bias=rows % 2 == 1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gemm_edges_of_k_and_n(qtype: Any) -> None:
    block = 256 if qtype in (Q.Q4_K, Q.Q6_K) else 32
    for out_rows, cols in ((1, block), (6, block), (25, 2 * block), (49, 3 * block)):
        check(qtype, 19, out_rows, cols, bias=True, seed=out_rows)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K], ids=lambda t: t.name)
def test_gemm_over_several_blocks_of_x(qtype: Any) -> None:
    """K = 4096: x goes through in blocks of 32 rows (512 KiB), each met by every weight group."""
    check(qtype, 70, 13, 4096, bias=True)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gemm_rows_do_not_depend_on_their_panel(qtype: Any) -> None:
    """A row's output is the same bits in the first panel of x (where Q4_0/Q4_1/Q8_0 weights are
    dequantised inside the micro-kernel), in a later whole panel (the weights read back from the
    scratch) and in a tail panel of a few rows (its half-width kernel): 37 weight rows (a last slice
    of 1 row, zero-padded)."""
    panel = 2 * quantized_gemm_lanes()
    blocks = torch.from_numpy(random_blocks(qtype, 37, cols_for(qtype)))
    x = torch.randn(panel, cols_for(qtype))
    stacked = torch.cat([x, x, x[:3]])
    got = quantized_gemm.quantized_gemm(stacked, blocks, int(qtype))
    assert torch.equal(got[:panel], got[panel : 2 * panel])
    assert torch.equal(got[:3], got[2 * panel :])
    assert torch.equal(got[:panel], quantized_gemm.quantized_gemm(x, blocks, int(qtype)))


def test_gemm_agrees_with_the_row_kernel_and_refuses_what_it_does() -> None:
    blocks = torch.from_numpy(random_blocks(Q.Q4_1, 40, 96))
    x = torch.randn(24, 96)
    torch.testing.assert_close(
        quantized_gemm.quantized_gemm(x, blocks, int(Q.Q4_1)),
        quantized_matmul(x, blocks, int(Q.Q4_1)),
        rtol=0,
        atol=1e-5,
    )
    assert quantized_gemm.quantized_gemm(x[:0], blocks, int(Q.Q4_1)).shape == (0, 40)
    with pytest.raises(ValueError, match="bytes do not hold"):
        quantized_gemm.quantized_gemm(torch.randn(2, 64), blocks, int(Q.Q4_1))
    with pytest.raises(ValueError, match="float32"):
        quantized_gemm.quantized_gemm(x.double(), blocks, int(Q.Q4_1))
    with pytest.raises(ValueError, match="bias"):
        quantized_gemm.quantized_gemm(x, blocks, int(Q.Q4_1), torch.randn(39))
    columns = torch.randn(96, 24).t()  # not contiguous: copied for the kernel
    torch.testing.assert_close(
        quantized_gemm.quantized_gemm(columns, blocks, int(Q.Q4_1)),
        quantized_gemm.quantized_gemm(columns.contiguous(), blocks, int(Q.Q4_1)),
    )


def test_vector_path_is_the_cpus() -> None:
    flags = cpu_flags()
    expected = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    assert quantized_gemm_lanes() == expected


def test_projection_dispatches_by_row_count(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def spy(name: str, function: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append(name)
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(quantized.BoundWeight, "gemm", spy("gemm", quantized.BoundWeight.gemm))
    monkeypatch.setattr(quantized.BoundWeight, "rows", spy("rows", quantized.BoundWeight.rows))
    part = QuantizedTensor(torch.from_numpy(random_blocks(Q.Q8_0, 20, 64)), int(Q.Q8_0), (20, 64))
    linear = QuantizedLinear([part])
    weight = part.dequantize().double()
    for rows, expected in (
        (1, "rows"),
        (GEMM_FROM_ROWS - 1, "rows"),
        (GEMM_FROM_ROWS, "gemm"),
        (64, "gemm"),
    ):
        calls.clear()
        x = torch.randn(rows, 64)
        torch.testing.assert_close(linear(x).double(), x.double() @ weight.T, rtol=0, atol=1e-4)
        assert calls == [expected], rows


# -- the generic vector path, built here on purpose (the AVX-512 build: test_quantized_kernels) -----


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 target flags")
def test_generic_path_matches_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library = ctypes.CDLL(str(_build(tmp_path, ["-march=x86-64"])))
    for name in ("quantized_gemm", "quantized_gemm_lanes", "dequantize_rows"):
        function = getattr(library, name)
        function.restype, function.argtypes = ctypes.c_int, kernels._SIGNATURES[name]
    monkeypatch.setattr(quantized_gemm, "load_library", lambda: library)
    assert quantized_gemm.quantized_gemm_lanes() == 4
    for qtype in TYPES:
        for rows in (3, 21):
            check(qtype, rows, 19, cols_for(qtype), bias=True, seed=rows)
    weight, bias = torch.randn(19, 64), torch.randn(19)  # float32 rows, read in place
    for rows in (3, 21):
        x = torch.randn(rows, 64)
        got = quantized_gemm.quantized_gemm(x, QuantizedTensor.of_float32(weight).blocks, GGML_F32, bias)
        assert relative_error(got, (x.double() @ weight.double().T + bias.double()).numpy()) < 1e-5


@pytest.fixture
def gemm_tiles() -> Any:
    """The library, its AMX tile path switched on for the test (and back as it was after)."""
    library = kernels.load_library()
    assert library is not None
    before = library.quantized_gemm_tiles(-1)
    if not library.quantized_gemm_tiles(1):
        pytest.skip("no AMX-BF16 tiles on this CPU (or the kernel refused them)")
    yield library
    library.quantized_gemm_tiles(before)


def test_tile_path_is_on_where_the_cpu_has_amx() -> None:
    library = kernels.load_library()
    assert library is not None
    has_amx = {"amx_tile", "amx_bf16", "avx512_bf16"} <= cpu_flags() and platform.system() == "Linux"
    before = library.quantized_gemm_tiles(-1)
    if not has_amx:
        assert library.quantized_gemm_tiles(1) == 0
    assert library.quantized_gemm_tiles(0) == 0
    library.quantized_gemm_tiles(before)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [15, 16, 17, 31, 32, 33, 100])
def test_tiles_match_the_reference_and_the_vector_path(gemm_tiles: Any, qtype: Any, rows: int) -> None:
    # 101 weight rows: a last group of 5 (one partial tile of 16, two empty); 15 rows stay on the vectors.
    cols = 3 * 32 if rows % 2 else 18 * 32
    blocks = random_blocks(qtype, 101, cols, seed=rows)
    weight = gguf.quants.dequantize(blocks, qtype).astype(np.float64)
    x, b = torch.randn(rows, cols), torch.randn(101)
    reference = x.double().numpy() @ weight.T + b.double().numpy()
    tiles = quantized_gemm.quantized_gemm(x, torch.from_numpy(blocks), int(qtype), b)
    gemm_tiles.quantized_gemm_tiles(0)
    vectors = quantized_gemm.quantized_gemm(x, torch.from_numpy(blocks), int(qtype), b)
    assert relative_error(tiles, reference) < 1e-6, relative_error(tiles, reference)
    assert relative_error(vectors, reference) < 1e-5
    if rows < 16:
        assert torch.equal(tiles, vectors)  # below one tile of rows the vector path runs


def test_tiles_keep_x_exact(gemm_tiles: Any) -> None:
    """x is split into three bf16 parts, not rounded to bf16: x that bf16 cannot hold (1 + 2^-9 u)
    gives float32 noise, a hundred times below what rounding x to bf16 would do."""
    blocks = random_blocks(Q.Q8_0, 48, 64)
    weight = torch.from_numpy(gguf.quants.dequantize(blocks, Q.Q8_0).astype(np.float64))
    x = 1.0 + torch.rand(32, 64) * 2.0**-9  # below bf16's resolution at 1.0
    got = quantized_gemm.quantized_gemm(x, torch.from_numpy(blocks), int(Q.Q8_0)).double()
    exact = x.double() @ weight.T
    rounded = x.bfloat16().double() @ weight.T
    error, bf16_error = float((got - exact).abs().max()), float((rounded - exact).abs().max())
    assert error < 1e-6 * float(exact.abs().max()) and bf16_error > 100 * error
