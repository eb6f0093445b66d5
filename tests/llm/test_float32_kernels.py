"""Float32 weights on the C kernels (``GGML_F32`` rows, read in place): the row kernel and the GEMM
against a float64 reference, and which projection ``make_linear`` builds for which weight. The
generic (x86-64 baseline) build's GEMM on them: ``test_quantized_gemm``'s generic-path test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from servekit.llm.kernels import kernels_available, quantized_gemm
from servekit.llm.kernels.quantized import GGML_F32, QuantizedTensor, quantized_matmul
from servekit.llm.kernels.quantized_gemm import quantized_gemm_lanes
from servekit.llm.models.layers import DenseMLP, make_linear
from servekit.llm.models.linear import Int8Linear, Linear
from servekit.llm.models.quantized_linear import GEMM_FROM_ROWS, QuantizedLinear

pytestmark = pytest.mark.skipif(not kernels_available(torch.float32), reason="no C compiler")


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)  # the threaded split of output rows is exercised


def relative_error(got: torch.Tensor, reference: np.ndarray) -> float:
    return float(np.abs(got.double().numpy() - reference).max() / np.abs(reference).max())


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> np.ndarray:
    out = x.double().numpy() @ weight.double().numpy().T
    return out if bias is None else out + bias.double().numpy()


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 6, 16, 17, 25, 33, 128])
def test_both_kernels_match_float64(rows: int) -> None:
    # 37 weight rows: a last group short of whole slices (copied and zero-padded), the rest read in place.
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(37, 96, generator=generator)
    bias = torch.randn(37, generator=generator) if rows % 2 else None
    x = torch.randn(rows, 96, generator=generator)
    rows_view = QuantizedTensor.of_float32(weight).blocks
    for kernel in (quantized_matmul, quantized_gemm.quantized_gemm):
        got = kernel(x, rows_view, GGML_F32, bias)
        assert got.shape == (rows, 37) and got.dtype == torch.float32
        assert relative_error(got, reference(x, weight, bias)) < 1e-5, (kernel.__name__, rows)


def test_long_rows_and_whole_groups() -> None:
    """K = 4096 (x in several L2-sized blocks) and 48 weight rows (whole groups only: all in place)."""
    weight, x, bias = torch.randn(48, 4096), torch.randn(70, 4096), torch.randn(48)
    got = quantized_gemm.quantized_gemm(x, QuantizedTensor.of_float32(weight).blocks, GGML_F32, bias)
    assert relative_error(got, reference(x, weight, bias)) < 1e-5


def test_gemm_rows_do_not_depend_on_their_panel() -> None:
    panel = 2 * quantized_gemm_lanes()
    blocks = QuantizedTensor.of_float32(torch.randn(37, 64)).blocks
    x = torch.randn(panel, 64)
    got = quantized_gemm.quantized_gemm(torch.cat([x, x, x[:3]]), blocks, GGML_F32)
    assert torch.equal(got[:panel], got[panel : 2 * panel])
    assert torch.equal(got[:3], got[2 * panel :])


def test_the_weight_is_read_in_place_and_checked() -> None:
    weight = torch.randn(8, 64)
    tensor = QuantizedTensor.of_float32(weight)
    assert tensor.blocks.data_ptr() == weight.data_ptr() and tensor.shape == (8, 64)
    assert torch.equal(tensor.dequantize(), weight)
    with pytest.raises(ValueError, match="float32"):
        QuantizedTensor.of_float32(weight.double())
    with pytest.raises(ValueError, match="whole blocks"):
        QuantizedTensor.of_float32(torch.randn(8, 48))  # 48 values: not whole vectors of 32
    with pytest.raises(ValueError, match="bytes do not hold"):
        quantized_matmul(torch.randn(2, 32), tensor.blocks, GGML_F32)


def test_make_linear_puts_float32_cpu_weights_on_the_kernels() -> None:
    weight, bias = torch.randn(40, 64), torch.randn(40)
    linear = make_linear(weight, bias, quantization=None, pack=True)
    assert isinstance(linear, QuantizedLinear) and not linear.on_gguf_blocks()
    assert linear.parts[0].blocks.data_ptr() == weight.data_ptr()  # no second copy of the weight
    for rows in (1, GEMM_FROM_ROWS - 1, GEMM_FROM_ROWS, 40):
        x = torch.randn(rows, 64)
        assert relative_error(linear(x), F.linear(x.double(), weight.double(), bias.double()).numpy()) < 1e-5
    # What the kernels do not take stays a Linear: a width not in vectors of 32, other dtypes, the
    # plain weights that pack=False keeps (MoE experts are stacked from them); int8 stays int8.
    assert isinstance(make_linear(torch.randn(40, 48), None, quantization=None, pack=True), Linear)
    assert isinstance(make_linear(weight.bfloat16(), None, quantization=None, pack=True), Linear)
    assert isinstance(make_linear(weight, None, quantization=None, pack=False), Linear)
    assert isinstance(make_linear(weight, None, quantization="int8", pack=True), Int8Linear)


def test_fused_paths_stay_on_gguf_blocks() -> None:
    """The one-call MLP (and the native decode step, by the same check) are built for GGUF blocks:
    an MLP of float32 rows runs its two projections."""
    generator = torch.Generator().manual_seed(0)
    up = make_linear(torch.randn(128, 64, generator=generator), None, quantization=None, pack=True)
    down = make_linear(torch.randn(64, 64, generator=generator), None, quantization=None, pack=True)
    assert isinstance(up, QuantizedLinear) and isinstance(down, QuantizedLinear)
    mlp = DenseMLP(up=up, down=down, act=F.silu, gated=True, fused=True)
    assert mlp.blocks is None
    x = torch.randn(3, 64, generator=generator)
    expected = down(F.silu(up(x)[:, :64]) * up(x)[:, 64:])  # (the C SiLU-and-multiply: float32 noise)
    assert (mlp(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
