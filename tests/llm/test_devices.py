"""Device resolution, device-dependent settings, and the device-generic path on the CPU.

CUDA is absent here: ``torch.cuda.is_available`` / ``device_count`` are mocked for the resolution
logic only; everything that computes runs for real on the CPU.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from servekit.llm import EngineConfig, LLMEngine
from servekit.llm import kernels as kernel_module
from servekit.llm.config import EngineConfigError
from servekit.llm.device import (
    DeviceError,
    auto_dtype,
    check_device_settings,
    kv_budget_from_memory,
    rank_threads,
    resolve_device,
)
from servekit.llm.loaders import load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner
from tests.llm.tiny_models import build_tiny_checkpoint

pytest.importorskip("transformers")


def cuda(available: bool, count: int = 0, bf16: bool = True) -> Any:
    """torch.cuda reporting ``count`` GPUs (for the resolution logic only)."""
    return mock.patch.multiple(
        torch.cuda,
        is_available=mock.Mock(return_value=available),
        device_count=mock.Mock(return_value=count),
        is_bf16_supported=mock.Mock(return_value=bf16),
    )


def test_auto_is_cuda_when_present_else_cpu() -> None:
    with cuda(False):
        assert resolve_device("auto") == torch.device("cpu")
    with cuda(True, 2):
        assert resolve_device("auto") == torch.device("cuda", 0)
        assert resolve_device("cuda") == torch.device("cuda", 0)
        assert resolve_device("CUDA:1") == torch.device("cuda", 1)
        with pytest.raises(DeviceError, match=r"cuda:2 but only 2 CUDA device\(s\) are visible"):
            resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu")


def test_an_absent_device_fails_with_a_clear_message() -> None:
    with cuda(False), pytest.raises(DeviceError, match=r"no CUDA GPU is available.*use --device cpu or auto"):
        resolve_device("cuda:0")
    with (
        mock.patch.object(torch.backends.mps, "is_available", return_value=False),
        pytest.raises(DeviceError, match="MPS is not available"),
    ):
        resolve_device("mps")


@pytest.mark.parametrize("bad", ["gpu0", "cuda:", "tpu", "cuda:-1", ""])
def test_malformed_devices_are_refused_by_the_config(bad: str) -> None:
    with pytest.raises(EngineConfigError, match="device must be auto, cpu, cuda, cuda:N or mps"):
        EngineConfig(device=bad)


def test_auto_dtype_is_bf16_where_the_device_has_it() -> None:
    assert auto_dtype(torch.device("cpu")) == torch.float32
    with cuda(True, 1, bf16=True):
        assert auto_dtype(torch.device("cuda", 0)) == torch.bfloat16
    with cuda(True, 1, bf16=False):
        assert auto_dtype(torch.device("cuda", 0)) == torch.float16


def test_settings_that_cannot_apply_are_refused() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(DeviceError, match=r"applies to CUDA GPUs only.*kv_cache_memory"):
        check_device_settings(EngineConfig(gpu_memory_utilization=0.8), cpu)
    with pytest.raises(EngineConfigError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        EngineConfig(gpu_memory_utilization=1.5)
    with cuda(True, 1):
        gpu = torch.device("cuda", 0)
        check_device_settings(EngineConfig(gpu_memory_utilization=0.8), gpu)
        with pytest.raises(DeviceError, match="give one"):
            check_device_settings(EngineConfig(gpu_memory_utilization=0.8, kv_cache_memory="1GiB"), gpu)
        with pytest.raises(DeviceError, match=r"tp=2 from cuda:0 needs GPUs cuda:0..cuda:1, but only 1"):
            check_device_settings(EngineConfig(tp=2), gpu)
    with pytest.raises(DeviceError, match="not on mps"):
        check_device_settings(EngineConfig(tp=2), torch.device("mps"))


def test_kv_budget_is_the_share_left_after_the_profiled_peak() -> None:
    gib = 1 << 30
    assert kv_budget_from_memory(16 * gib, 4 * gib, 0.5) == 4 * gib
    with pytest.raises(DeviceError, match="leaves no room for the KV cache"):
        kv_budget_from_memory(16 * gib, 9 * gib, 0.5)


def test_each_rank_gets_its_share_of_the_threads() -> None:
    assert rank_threads(None, 1) is None
    assert rank_threads(4, 1) == 4
    assert rank_threads(4, 2) == 2
    assert rank_threads(1, 2) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_engine_on_cuda_fails_at_start_here(tmp_path: Path) -> None:
    model = build_tiny_checkpoint(tmp_path / "tiny", "llama")
    with pytest.raises(DeviceError, match="device=cuda but no CUDA GPU is available"):
        LLMEngine(EngineConfig(model=str(model), device="cuda"))
    with pytest.raises(DeviceError, match="applies to CUDA GPUs only"):
        LLMEngine(EngineConfig(model=str(model), gpu_memory_utilization=0.9))


def test_the_generic_path_matches_the_kernel_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``SERVEKIT_KERNELS=0`` on ``device="cpu"``: attention over gathered blocks with SDPA, plain
    PyTorch elementwise ops, the code every other device runs."""
    torch.set_num_threads(1)
    source = load_model_source(str(build_tiny_checkpoint(tmp_path / "tiny", "qwen2")))
    rng = random.Random(0)
    vocab = source.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (9, 14)]
    steps = [
        ForwardBatch(prompts, [0, 0], [[3, 7, 1], [0, 5, 2, 6]], all_logits=[True, True]),
        ForwardBatch([[5], [11]], [9, 14], [[3, 7, 1], [0, 5, 2, 6]]),
        ForwardBatch([[6], [12]], [10, 15], [[3, 7, 1], [0, 5, 2, 6]]),
    ]

    def run() -> tuple[bool, list[torch.Tensor]]:
        kernel_module.load_library.cache_clear()
        runner = ModelRunner(
            source.config, source.iter_weights(), device="cpu", block_size=4, num_blocks=8, max_model_len=32
        )
        outputs = [runner.execute(step) for step in steps]
        logits = [out.last_logits for out in outputs]
        logits += [a for a in outputs[0].all_logits if a is not None]
        return runner.decode_kernel, logits

    try:
        with_kernels, expected = run()
        monkeypatch.setenv("SERVEKIT_KERNELS", "0")
        without, got = run()
    finally:
        monkeypatch.delenv("SERVEKIT_KERNELS", raising=False)
        kernel_module.load_library.cache_clear()
    assert not without
    if not with_kernels:
        pytest.skip("no C compiler here: both runs took the generic path")
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_static_shape_decode_of_cuda_graphs_matches_eager(tmp_path: Path, model_type: str) -> None:
    """The padded, fixed-shape decode step the CUDA graphs replay, run eagerly on the CPU: padding
    rows write only to the scratch block and every real row gets the ordinary path's logits."""
    from tests.llm.tiny_models import LLAMA_LIKE, build_family_checkpoint

    torch.set_num_threads(1)
    config = {**LLAMA_LIKE, "head_dim": 16, "sliding_window": 5} if model_type == "gemma2" else LLAMA_LIKE
    source = load_model_source(str(build_family_checkpoint(tmp_path / model_type, model_type, config)))
    settings: dict[str, Any] = {"block_size": 4, "num_blocks": 12, "max_model_len": 24}
    plain = ModelRunner(source.config, source.iter_weights(), **settings)
    graphed = ModelRunner(source.config, source.iter_weights(), cuda_graphs=True, max_num_seqs=8, **settings)
    assert graphed.graphs is not None and graphed.graphs.sizes == [1, 2, 4, 8]
    assert graphed.num_blocks == 12 and graphed.kv_cache.num_blocks == 13  # block 12: the scratch block
    rng = random.Random(1)
    vocab = source.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (7, 3, 10)]
    tables = [[4, 0, 5], [9, 1], [2, 7, 11]]
    prefill = ForwardBatch(prompts, [0, 0, 0], tables)
    for runner in (plain, graphed):
        runner.execute(prefill)
    lengths = [len(p) for p in prompts]
    for _ in range(2):
        step = ForwardBatch([[rng.randrange(vocab)] for _ in prompts], list(lengths), tables)
        assert graphed.graphs.supports(step)
        expected, got = plain.execute(step), graphed.execute(step)
        assert got.last_logits.shape == expected.last_logits.shape == (3, vocab)
        torch.testing.assert_close(got.last_logits, expected.last_logits, atol=1e-5, rtol=0)
        lengths = [n + 1 for n in lengths]
    assert not graphed.graphs.supports(prefill)  # prefill steps run eagerly


def test_fresh_prefill_goes_through_flash_attention_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The optional flash-attn hook, with a stand-in package (``[batch, tokens, heads, dim]`` in and
    out, as flash_attn_func takes them) and the CUDA-only gate opened on the CPU."""
    import sys
    import types

    import torch.nn.functional as F

    from servekit.llm import attention, flash
    from servekit.llm.attention import build_attention_metadata, paged_attention

    calls: list[tuple[int, ...]] = []

    def fake_flash_attn_func(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        assert kwargs == {"softmax_scale": None, "causal": True}
        calls.append(tuple(k.shape))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return out.transpose(1, 2)

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(6, h, 8, generator=generator) for h in (4, 2, 2))
    cache = torch.zeros(4, 2, 2, 4, 8)

    def attend() -> torch.Tensor:
        metadata = build_attention_metadata(
            block_size=4,
            decode_block_tables=[],
            decode_context_lens=[],
            prefill_block_tables=[[1, 3]],
            prefill_starts=[0],
            prefill_lens=[6],
            slot_mapping=torch.tensor([4, 5, 6, 7, 12, 13]),
        )
        return paged_attention(query, key, value, cache, metadata)

    expected = attend()
    assert flash.flash_causal_prefill(query, key, value, None) is None  # the CPU: not applicable
    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash_attn_func)
    )
    monkeypatch.setattr(flash, "flash_applies", lambda query: True)
    flash.flash_attn_func.cache_clear()
    try:
        got = attend()
    finally:
        flash.flash_attn_func.cache_clear()
    assert calls == [(1, 6, 2, 8)]  # grouped-query heads passed as they are
    assert attention.flash_causal_prefill is flash.flash_causal_prefill
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
