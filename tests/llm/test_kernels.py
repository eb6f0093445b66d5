"""The C kernels (decode attention over the paged cache, int8 row passes) against the PyTorch paths."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from servekit.cpu import cpu_flags
from servekit.llm import kernels
from servekit.llm.attention import build_attention_metadata, paged_attention
from servekit.llm.kernels import attention as kernel_attention
from servekit.llm.kernels import attention_simd_lanes, load_library
from servekit.llm.kernels.attention import attention_threads, rotary_write_kv
from servekit.llm.kernels.elementwise import add_norm, gelu_tanh, silu_mul
from servekit.llm.kernels.int8 import dequantize, quantize_rows
from servekit.llm.model_config import ModelConfig
from servekit.llm.models.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def decode_case(
    *, heads: int, kv_heads: int, head_dim: int, lengths: list[int], dtype: torch.dtype, kv_dtype: torch.dtype
) -> tuple[Any, ...]:
    generator = torch.Generator().manual_seed(len(lengths) * 31 + heads)
    block_size, num_blocks = 4, 96
    cache = torch.randn((num_blocks, 2, kv_heads, block_size, head_dim), generator=generator).to(kv_dtype)
    order = list(range(num_blocks))
    random.Random(heads).shuffle(order)
    tables = []
    for length in lengths:
        tables.append([order.pop() for _ in range((length + block_size - 1) // block_size)])
    slots = torch.tensor(
        [
            t[(n - 1) // block_size] * block_size + (n - 1) % block_size
            for t, n in zip(tables, lengths, strict=True)
        ]
    )
    query = torch.randn((len(lengths), heads, head_dim), generator=generator).to(dtype)
    key = torch.randn((len(lengths), kv_heads, head_dim), generator=generator).to(dtype)
    value = torch.randn((len(lengths), kv_heads, head_dim), generator=generator).to(dtype)
    return cache, tables, slots, query, key, value, block_size


def attend(
    case: tuple, lengths: list[int], *, kernel: bool, window: int | None, dtype: torch.dtype
) -> torch.Tensor:
    cache, tables, slots, query, key, value, block_size = case
    metadata = build_attention_metadata(
        block_size=block_size,
        decode_block_tables=tables,
        decode_context_lens=lengths,
        prefill_block_tables=[],
        prefill_starts=[],
        prefill_lens=[],
        slot_mapping=slots,
        dtype=dtype,
        sliding_window=window,
        decode_kernel=kernel,
    )
    assert (metadata.decode_lens is not None) == kernel
    return paged_attention(query, key, value, cache.clone(), metadata).float()


@pytest.mark.parametrize(
    ("dtype", "kv_dtype", "atol"),
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.float32, torch.bfloat16, 1e-5),
        (torch.float32, torch.float16, 1e-5),
        (torch.bfloat16, torch.bfloat16, 2e-2),
        (torch.float16, torch.float16, 2e-3),
    ],
)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "window"),
    # 24: AVX2's 8 lanes but not AVX-512's 16; 20: neither (the portable loop); groups of 1-5 query
    # heads per KV head (the vector path takes them 3 at a time); head_dim 40/48: 5/6 AVX2 vectors
    [
        (9, 3, 64, None),
        (4, 4, 32, None),
        (8, 2, 16, 7),
        (6, 2, 24, None),
        (4, 2, 20, None),
        (10, 2, 40, None),
        (4, 2, 48, 9),
    ],
)
def test_decode_kernel_matches_the_pytorch_path(
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    atol: float,
    heads: int,
    kv_heads: int,
    head_dim: int,
    window: int | None,
) -> None:
    lengths = [1, 2, 5, 17, 33, 64]
    case = decode_case(
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, lengths=lengths, dtype=dtype, kv_dtype=kv_dtype
    )
    expected = attend(case, lengths, kernel=False, window=window, dtype=dtype)
    got = attend(case, lengths, kernel=True, window=window, dtype=dtype)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    # And against attention written out by hand, for the longest sequence, head 0.
    cache, tables, _, query, key, value, block_size = case
    last = len(lengths) - 1
    rows = [(tables[last][p // block_size], p % block_size) for p in range(lengths[last] - 1)]
    keys = torch.stack([cache[b, 0, 0, o].float() for b, o in rows] + [key[last, 0].to(kv_dtype).float()])
    values = torch.stack([cache[b, 1, 0, o].float() for b, o in rows] + [value[last, 0].to(kv_dtype).float()])
    if window is not None:
        keys, values = keys[-window:], values[-window:]
    weights = torch.softmax(keys @ query[last, 0].float() / head_dim**0.5, dim=0)
    torch.testing.assert_close(got[last, :head_dim], weights @ values, atol=max(atol, 1e-5), rtol=0)


def test_decode_attention_wakes_a_second_thread_only_for_enough_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    assert attention_threads(1, 4, 16, 3) == 1  # batch 1, 64 keys: the calling thread alone
    assert attention_threads(32, 64, 16, 3) == 2  # PyTorch's 2 threads (the fixture)
    lengths = [1, 2, 5, 17, 33, 64]
    case = decode_case(
        heads=9, kv_heads=3, head_dim=64, lengths=lengths, dtype=torch.float32, kv_dtype=torch.float32
    )
    alone = attend(case, lengths, kernel=True, window=None, dtype=torch.float32)
    monkeypatch.setattr(kernel_attention, "KEYS_PER_THREAD", 1)  # the threaded split of these sequences
    split = attend(case, lengths, kernel=True, window=None, dtype=torch.float32)
    torch.testing.assert_close(split, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        split, attend(case, lengths, kernel=False, window=None, dtype=torch.float32), atol=1e-5, rtol=0
    )


def test_kernels_build_into_the_cache_dir_and_can_be_disabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVEKIT_CACHE_DIR", str(tmp_path))
    kernels.load_library.cache_clear()
    try:
        assert kernels.load_library() is not None
        built = list((tmp_path / "kernels").glob("servekit_kernels-*.so"))
        assert len(built) == 1
        assert not [p for p in (tmp_path / "kernels").iterdir() if p not in built]  # no scratch files left
        monkeypatch.setenv("SERVEKIT_KERNELS", "0")
        kernels.load_library.cache_clear()
        assert kernels.load_library() is None
        monkeypatch.setenv("SERVEKIT_KERNELS", "1")
        monkeypatch.setenv("CC", "/nonexistent/cc")
        kernels.load_library.cache_clear()
        assert kernels.load_library() is None  # no compiler: callers fall back to PyTorch
    finally:
        kernels.load_library.cache_clear()
        shutil.rmtree(tmp_path / "kernels", ignore_errors=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_row_kernels_match_the_formula(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn((7, 300), generator=generator) * torch.arange(1, 8).unsqueeze(1)).to(dtype)
    x[3] = 0  # an all-zero row must not divide by zero
    quantised, scales = quantize_rows(x)
    source = x.float()
    expected_scales = source.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0)
    expected = torch.round(source / expected_scales).clamp(-127, 127)
    assert (quantised.float() - expected).abs().max() <= 1  # reciprocal vs division: at most one step
    assert int(quantised.abs().max()) == 127 and not quantised[3].any()

    acc = torch.randint(-50000, 50000, (7, 300), dtype=torch.int32, generator=generator)
    col_scales = torch.rand(300, generator=generator)
    bias = torch.randn(300, generator=generator)
    got = dequantize(acc, scales, col_scales, bias, dtype)
    reference = acc.float() * scales * col_scales + bias
    assert got.dtype == dtype
    torch.testing.assert_close(
        got.float(), reference.to(dtype).float(), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-4
    )


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
def test_elementwise_kernels_match_pytorch(dtype: torch.dtype, atol: float) -> None:
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn((5, 96), generator=generator).to(dtype)
    delta = torch.randn((5, 96), generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(96, generator=generator)).to(dtype)
    expected_hidden = hidden.clone()
    expected = add_norm(expected_hidden, delta, weight, None, 1e-5, rms=True, fused=False)
    got_hidden = hidden.clone()
    got = add_norm(got_hidden, delta, weight, None, 1e-5, rms=True, fused=True)
    torch.testing.assert_close(got_hidden, expected_hidden, atol=0, rtol=0)  # the residual add, in place
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=0)
    no_delta = add_norm(hidden.clone(), None, weight, None, 1e-5, rms=True, fused=True)
    reference = (
        hidden.float() * torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float()
    )
    torch.testing.assert_close(no_delta.float(), reference, atol=atol, rtol=0)

    # PyTorch rounds silu(gate) to the dtype before the product; the kernel rounds once: relative tolerance.
    gate_up = torch.randn((5, 2 * 70), generator=generator).to(dtype) * 4
    gate_up[0, :6] = torch.tensor([-200.0, -90.0, -80.5, 0.0, 40.0, 100.0])  # the far tails of silu
    torch.testing.assert_close(
        silu_mul(gate_up, fused=True).float(),
        silu_mul(gate_up.clone(), fused=False).float(),
        atol=atol,
        rtol=atol,
    )

    # GELU's tanh form (gelu_new), far tails included, against PyTorch's in float64.
    x = torch.cat(
        [torch.randn(700, generator=generator) * 4, torch.tensor([-200.0, -30.0, -9.0, 0.0, 9.0, 200.0])]
    )
    x = x.view(2, -1).to(dtype)
    expected_gelu = F.gelu(x.double(), approximate="tanh")
    torch.testing.assert_close(gelu_tanh(x, fused=True).double(), expected_gelu, atol=atol, rtol=atol)
    torch.testing.assert_close(gelu_tanh(x, fused=False).double(), expected_gelu, atol=atol, rtol=atol)


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
@pytest.mark.parametrize("rows", [5, 3000])  # 3000 x 96: past the kernel's threshold for threads
def test_the_fused_layer_norm_matches_pytorch(dtype: torch.dtype, atol: float, rows: int) -> None:
    if load_library() is None:
        pytest.skip("no C compiler here")
    generator = torch.Generator().manual_seed(12)
    # An offset mean, as residual streams have: a one-pass variance would lose digits to it.
    hidden = (3 + torch.randn((rows, 96), generator=generator)).to(dtype)
    delta, extra = (torch.randn((rows, 96), generator=generator).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(96, generator=generator)).to(dtype)
    bias = (0.1 * torch.randn(96, generator=generator)).to(dtype)
    for norm_bias in (bias, None):
        # A parallel block: (attention + MLP) + residual, rounded once to the dtype.
        expected_hidden = (hidden.float() + (delta.float() + extra.float())).to(dtype)
        float_bias = None if norm_bias is None else norm_bias.float()
        expected = F.layer_norm(expected_hidden.float(), (96,), weight.float(), float_bias, 1e-5)
        got_hidden = hidden.clone()
        got = add_norm(got_hidden, delta, weight, norm_bias, 1e-5, rms=False, fused=True, extra=extra)
        torch.testing.assert_close(got_hidden, expected_hidden, atol=0, rtol=0)
        torch.testing.assert_close(got.float(), expected, atol=atol, rtol=0)
        alone = add_norm(hidden.clone(), None, weight, norm_bias, 1e-5, rms=False, fused=True)
        reference = F.layer_norm(hidden.float(), (96,), weight.float(), float_bias, 1e-5)
        torch.testing.assert_close(alone.float(), reference, atol=atol, rtol=0)


def test_the_attention_kernel_uses_the_widest_vectors_this_cpu_has() -> None:
    if load_library() is None:
        pytest.skip("no C compiler here")
    flags = cpu_flags()
    if "avx512f" in flags:
        expected = 16
    elif {"avx2", "fma", "f16c"} <= flags:
        expected = 8
    else:
        expected = 1
    assert attention_simd_lanes() == expected


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [16, 8, None])
def test_rotary_and_cache_write_kernel_matches_pytorch(kv_dtype: torch.dtype, rotary_dim: int | None) -> None:
    """One C pass: rotary on q/k (whole or partial head), keys/values into their (shuffled) slots."""
    heads, kv_heads, head_dim, block_size, tokens = 6, 2, 16, 4, 7
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn((tokens, (heads + 2 * kv_heads) * head_dim), generator=generator)
    positions = torch.tensor([0, 3, 4, 5, 17, 18, 40])
    slots = torch.randperm(12 * block_size, generator=generator)[:tokens]
    cache = torch.randn((12, 2, kv_heads, block_size, head_dim), generator=generator).to(kv_dtype)
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=10,
        hidden_size=heads * head_dim,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=64,
        rotary_dim=rotary_dim,
    )
    cos_sin = RotaryEmbedding(config, max_model_len=64, dtype=torch.float32).cos_sin(positions, 40)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    query = RotaryEmbedding.apply(qkv[:, :q_width].reshape(tokens, heads, head_dim), *cos_sin)
    key = RotaryEmbedding.apply(
        qkv[:, q_width : q_width + kv_width].reshape(tokens, kv_heads, head_dim), *cos_sin
    )
    value = qkv[:, q_width + kv_width :].reshape(tokens, kv_heads, head_dim)
    expected = cache.clone()
    expected[slots // block_size, 0, :, slots % block_size] = key.to(kv_dtype)
    expected[slots // block_size, 1, :, slots % block_size] = value.to(kv_dtype)

    got = qkv.clone()
    rotary_write_kv(got, *cos_sin, slots, cache, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    torch.testing.assert_close(got[:, :q_width], query.reshape(tokens, -1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        got[:, q_width:], torch.cat([key, value], 1).reshape(tokens, -1), atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(cache.float(), expected.float(), atol=1e-6, rtol=1e-6)

    plain = qkv.clone()  # no rotary: only the cache write
    rotary_write_kv(
        plain, None, None, slots, cache, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim
    )
    torch.testing.assert_close(plain, qkv, atol=0, rtol=0)
    with pytest.raises(ValueError, match="slots"):
        rotary_write_kv(
            qkv, None, None, slots.int(), cache, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim
        )
