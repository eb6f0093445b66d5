"""Tensor parallelism on CPU (gloo, 2 ranks): the split model computes what the whole one does.

Each family's tiny checkpoint runs once whole (a ``ModelRunner``) and once as an ``LLMEngine`` with
``tp=2`` (this process is rank 0, a child process rank 1): float32 logits within 1e-5 at a prefill,
at decode steps beside a chunked prefill, and equal greedy outputs through the engine.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from servekit.llm import EngineConfig, LLMEngine, SamplingParams
from servekit.llm.distributed import TensorParallelError, check_tensor_parallel
from servekit.llm.loaders import load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner
from servekit.llm.tp_runner import TensorParallelRunner
from tests.llm.tiny_models import LLAMA_LIKE, build_family_checkpoint

pytest.importorskip("transformers")

ATOL = 1e-5
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", LLAMA_LIKE),
    "llama-one-kv-head": ("llama", {**LLAMA_LIKE, "num_key_value_heads": 1, "tie_word_embeddings": True}),
    "qwen2": ("qwen2", LLAMA_LIKE),
    "mixtral": ("mixtral", {**LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "qwen2_moe",
        {
            **LLAMA_LIKE,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
        },
    ),
}
SETTINGS: dict[str, Any] = {"max_model_len": 64, "block_size": 4, "num_kv_blocks": 64, "num_threads": 2}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_type, config = FAMILIES[request.param]
    return build_family_checkpoint(tmp_path_factory.mktemp(request.param), model_type, config)


@pytest.fixture(scope="module")
def tp_engine(checkpoint: Path) -> Iterator[LLMEngine]:
    engine = LLMEngine(EngineConfig(model=str(checkpoint), tp=2, **SETTINGS))
    runner = engine.runner
    assert isinstance(runner, TensorParallelRunner)
    yield engine
    pids = runner.rank_pids
    runner.close()
    assert all(not _alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def listening_addresses(pids: list[int]) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} shows them) of the TCP sockets ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].rpartition(":")[0])
    return found


def test_ranks_listen_on_loopback_only(tp_engine: LLMEngine) -> None:
    runner = tp_engine.runner
    assert isinstance(runner, TensorParallelRunner)
    addresses = listening_addresses([os.getpid(), *runner.rank_pids])
    assert addresses  # the store and gloo's pairs
    assert set(addresses) == {"0100007F"}  # 127.0.0.1, nothing on other interfaces or IPv6


def _tables(lengths: list[int], seed: int) -> list[list[int]]:
    free = list(range(SETTINGS["num_kv_blocks"]))
    random.Random(seed).shuffle(free)
    return [[free.pop() for _ in range(-(-n // SETTINGS["block_size"]))] for n in lengths]


def test_logits_match_the_whole_model(checkpoint: Path, tp_engine: LLMEngine) -> None:
    source = load_model_source(str(checkpoint))
    whole = ModelRunner(source.config, source.iter_weights(), block_size=4, num_blocks=64, max_model_len=64)
    split = tp_engine.runner
    rng = random.Random(0)
    vocab = source.config.vocab_size
    first = [rng.randrange(vocab) for _ in range(13)]
    second = [rng.randrange(vocab) for _ in range(11)]
    table_a, table_b = _tables([13 + 6, 11], seed=3)

    prefill = ForwardBatch([first], [0], [table_a], all_logits=[True])
    expected, got = whole.execute(prefill), split.execute(prefill)
    assert got.all_logits[0] is not None and expected.all_logits[0] is not None
    assert got.last_logits.shape == (1, vocab)
    torch.testing.assert_close(got.all_logits[0], expected.all_logits[0], atol=ATOL, rtol=0)
    # Decode steps of `first` beside a chunked prefill of `second` (one chunk of a single token).
    for start, end in [(0, 5), (5, 6), (6, 11)]:
        first.append(int(expected.last_logits[0].argmax()))
        step = ForwardBatch([second[start:end], [first[-1]]], [start, len(first) - 1], [table_b, table_a])
        expected, got = whole.execute(step), split.execute(step)
        torch.testing.assert_close(got.last_logits, expected.last_logits, atol=ATOL, rtol=0)


def test_greedy_outputs_match_tp1(checkpoint: Path, tp_engine: LLMEngine) -> None:
    prompts = ["Hello, world! How are you today?", "def generate(prompt: str) -> str:"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    single = LLMEngine(EngineConfig(model=str(checkpoint), **SETTINGS))

    def run(engine: LLMEngine) -> list[list[int]]:
        for index, prompt in enumerate(prompts):
            engine.add_request(f"r{index}", prompt, params)
        finals: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finals[output.request_id] = output.outputs[0].token_ids
        return [finals[f"r{i}"] for i in range(len(prompts))]

    assert run(tp_engine) == run(single)


def test_unsplittable_models_are_refused_at_start(checkpoint: Path) -> None:
    config = load_model_source(str(checkpoint)).config
    with pytest.raises(TensorParallelError, match="4 attention heads do not divide into 3 ranks"):
        check_tensor_parallel(config, 3)
    with pytest.raises(TensorParallelError, match="not split across ranks"):
        check_tensor_parallel(config, 2, quantization="int8")
    with pytest.raises(TensorParallelError, match="tp=8 does not fit"):
        LLMEngine(EngineConfig(model=str(checkpoint), tp=8, **SETTINGS))
