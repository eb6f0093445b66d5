"""The engine on a CUDA GPU against the same engine on the CPU (skipped where there is no GPU;
``benchmarks/gpu_check.py`` runs this file on GPU machines)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from servekit.llm import EngineConfig, LLMEngine, SamplingParams
from servekit.llm.loaders import load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner
from tests.llm.tiny_models import LLAMA_LIKE, build_family_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

FAMILIES = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "mixtral": {**LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma2": {**LLAMA_LIKE, "head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 12},
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_checkpoint(
        tmp_path_factory.mktemp(request.param), request.param, FAMILIES[request.param]
    )


def steps(vocab: int) -> list[ForwardBatch]:
    rng = random.Random(0)
    first = [rng.randrange(vocab) for _ in range(13)]
    second = [rng.randrange(vocab) for _ in range(9)]
    tables = [[5, 2, 9, 0, 7], [3, 8, 1]]
    return [
        ForwardBatch([first], [0], [tables[0]], all_logits=[True]),
        ForwardBatch([second[:4], [7]], [0, 13], [tables[1], tables[0]]),
        ForwardBatch([second[4:], [8]], [4, 14], [tables[1], tables[0]]),
    ]


def test_cuda_logits_match_cpu(checkpoint: Path) -> None:
    source = load_model_source(str(checkpoint))
    outputs = {}
    for device in ("cpu", "cuda"):
        runner = ModelRunner(
            source.config, source.iter_weights(), device=device, block_size=4, num_blocks=16, max_model_len=64
        )
        outputs[device] = [runner.execute(step).last_logits.cpu() for step in steps(source.config.vocab_size)]
    for cpu, gpu in zip(outputs["cpu"], outputs["cuda"], strict=True):
        torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=0)


def test_cuda_engine_greedy_matches_cpu_and_sizes_its_cache(checkpoint: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    results = []
    for settings in (
        {"device": "cpu", "num_kv_blocks": 64},
        {"device": "cuda", "gpu_memory_utilization": 0.5},
    ):
        engine = LLMEngine(EngineConfig(model=str(checkpoint), max_model_len=64, dtype="float32", **settings))
        engine.add_request("r", "Hello, world! How are you today?", params)
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    results.append(output.outputs[0].token_ids)
        if settings["device"] == "cuda":
            assert engine.runner.num_blocks > 64  # half a GPU holds far more than the CPU run's cache
    assert results[0] == results[1]


def test_cuda_auto_dtype_is_16_bit(checkpoint: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(checkpoint), device="cuda", max_model_len=64, num_kv_blocks=32))
    assert engine.dtype in (torch.bfloat16, torch.float16)
    engine.add_request("r", "Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, seed=1))
    while engine.has_unfinished_requests():
        engine.step()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_tp2_greedy_matches_tp1(checkpoint: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    results = []
    for tp in (1, 2):
        engine = LLMEngine(
            EngineConfig(
                model=str(checkpoint),
                device="cuda",
                tp=tp,
                dtype="float32",
                max_model_len=64,
                num_kv_blocks=64,
            )
        )
        engine.add_request("r", "Hello, world!", params)
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    results.append(output.outputs[0].token_ids)
        close = getattr(engine.runner, "close", None)
        if close is not None:
            close()
    assert results[0] == results[1]
