"""ModelRunner against Hugging Face transformers on tiny random checkpoints (logits within 1e-4, fp32)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from servekit.llm.loaders.hf import model_config_from_hf
from servekit.llm.model_config import ModelConfig
from servekit.llm.model_runner import ForwardBatch, ModelRunner

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
VOCAB = 320


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def build_reference(
    arch: str = "llama", *, tie: bool = False, seed: int = 0, **overrides: Any
) -> tuple[Any, ModelConfig]:
    """A tiny random transformers model and the ModelConfig our loader derives from its config."""
    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
    }
    common.update(overrides)
    config_class = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }[arch]
    if arch == "qwen3":
        common.setdefault("head_dim", 16)
    hf_config = config_class(**common)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=generator))
    return model, model_config_from_hf(hf_config.to_dict())


def make_runner(model: Any, config: ModelConfig, **kwargs: Any) -> ModelRunner:
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("num_blocks", 128)
    return ModelRunner(config, model.state_dict().items(), **kwargs)


def reference_logits(model: Any, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


class BlockAllocator:
    """Hands out shuffled (non-contiguous) block ids, like a block manager after some churn."""

    def __init__(self, num_blocks: int, seed: int = 0) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def table(self, num_tokens: int, block_size: int) -> list[int]:
        return [self.free.pop() for _ in range((num_tokens + block_size - 1) // block_size)]


ARCH_CASES = [
    pytest.param("llama", {}, id="llama"),
    pytest.param("llama", {"tie": True}, id="llama-tied"),
    pytest.param("qwen2", {}, id="qwen2-bias"),
    pytest.param("qwen3", {}, id="qwen3-qknorm"),
    pytest.param("qwen3", {"tie": True, "num_key_value_heads": 4}, id="qwen3-tied-mha"),
    pytest.param(
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            "rope_theta": 500000.0,
        },
        id="llama3-rope",
    ),
    pytest.param("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, id="linear-rope"),
    pytest.param(
        "qwen2",
        {
            "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32},
        },
        id="yarn-rope",
    ),
]


@pytest.mark.parametrize(("arch", "overrides"), ARCH_CASES)
def test_prefill_and_greedy_decode_match_transformers(arch: str, overrides: dict[str, Any]) -> None:
    model, config = build_reference(arch, **overrides)
    runner = make_runner(model, config)
    prompt = random_prompt(21, seed=1)
    table = BlockAllocator(runner.num_blocks).table(21 + 12, runner.block_size)

    out = runner.execute(ForwardBatch([prompt], [0], [table], all_logits=[True]))
    reference = reference_logits(model, prompt)
    assert out.all_logits[0] is not None
    torch.testing.assert_close(out.all_logits[0], reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.last_logits[0], reference[-1], atol=ATOL, rtol=0)

    sequence = list(prompt)
    for _ in range(12):
        token = int(out.last_logits[0].argmax())
        sequence.append(token)
        out = runner.execute(ForwardBatch([[token]], [len(sequence) - 1], [table]))
        assert out.all_logits == [None]
        torch.testing.assert_close(
            out.last_logits[0], reference_logits(model, sequence)[-1], atol=ATOL, rtol=0
        )


def test_chunked_prefill_matches_single_prefill() -> None:
    model, config = build_reference("qwen2")
    runner = make_runner(model, config)
    prompt = random_prompt(30, seed=2)
    table = BlockAllocator(runner.num_blocks, seed=3).table(30, runner.block_size)
    reference = reference_logits(model, prompt)

    # Uneven chunks, one of a single token, boundaries inside blocks.
    chunks = [(0, 7), (7, 8), (8, 19), (19, 30)]
    for start, end in chunks:
        out = runner.execute(ForwardBatch([prompt[start:end]], [start], [table], all_logits=[True]))
        assert out.all_logits[0] is not None
        torch.testing.assert_close(out.all_logits[0], reference[start:end], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.last_logits[0], reference[end - 1], atol=ATOL, rtol=0)


def test_mixed_batch_of_prefills_and_decodes() -> None:
    model, config = build_reference("qwen3")
    runner = make_runner(model, config)
    allocator = BlockAllocator(runner.num_blocks, seed=4)
    block_size = runner.block_size

    # Three sequences already prefilled to different lengths.
    running = [random_prompt(n, seed=10 + n) for n in (5, 13, 26)]
    tables = [allocator.table(len(p) + 8, block_size) for p in running]
    out = runner.execute(ForwardBatch(running, [0, 0, 0], tables))
    next_tokens = [int(row.argmax()) for row in out.last_logits]

    # A new prompt arrives: its first chunk is computed in the same steps as the others' decodes;
    # the batch order deliberately puts the prefill between decodes.
    newcomer = random_prompt(17, seed=99)
    newcomer_table = allocator.table(17 + 8, block_size)
    newcomer_done = 0
    for step in range(4):
        for seq, token in zip(running, next_tokens, strict=True):
            seq.append(token)
        chunk_end = min(len(newcomer), newcomer_done + 9)
        token_ids = [[running[0][-1]], newcomer[newcomer_done:chunk_end], [running[1][-1]], [running[2][-1]]]
        starts = [len(running[0]) - 1, newcomer_done, len(running[1]) - 1, len(running[2]) - 1]
        batch_tables = [tables[0], newcomer_table, tables[1], tables[2]]
        want_all = [False, True, False, step == 0]
        out = runner.execute(ForwardBatch(token_ids, starts, batch_tables, all_logits=want_all))

        for row, seq in zip((0, 2, 3), running, strict=True):
            torch.testing.assert_close(
                out.last_logits[row], reference_logits(model, seq)[-1], atol=ATOL, rtol=0
            )
        newcomer_reference = reference_logits(model, newcomer[:chunk_end])
        torch.testing.assert_close(out.last_logits[1], newcomer_reference[-1], atol=ATOL, rtol=0)
        chunk_logits = out.all_logits[1]
        assert chunk_logits is not None
        torch.testing.assert_close(
            chunk_logits, newcomer_reference[newcomer_done:chunk_end], atol=ATOL, rtol=0
        )
        assert out.all_logits[0] is None and out.all_logits[2] is None
        if step == 0:
            assert out.all_logits[3] is not None
            torch.testing.assert_close(out.all_logits[3][0], out.last_logits[3])

        next_tokens = [int(out.last_logits[row].argmax()) for row in (0, 2, 3)]
        if chunk_end == len(newcomer):
            running.append(newcomer)
            tables.append(newcomer_table)
            next_tokens.append(int(out.last_logits[1].argmax()))
            newcomer = []
            break
        newcomer_done = chunk_end
    assert not newcomer, "the newcomer's prefill should have completed"

    # One more step with all four decoding together.
    for seq, token in zip(running, next_tokens, strict=True):
        seq.append(token)
    out = runner.execute(ForwardBatch([[s[-1]] for s in running], [len(s) - 1 for s in running], tables))
    for row, seq in enumerate(running):
        torch.testing.assert_close(out.last_logits[row], reference_logits(model, seq)[-1], atol=ATOL, rtol=0)


def test_sequences_not_sampled_get_no_logits_row() -> None:
    model, config = build_reference("llama")
    runner = make_runner(model, config)
    allocator = BlockAllocator(runner.num_blocks, seed=5)
    first, second, third = (random_prompt(n, seed=20 + n) for n in (9, 14, 21))
    tables = [allocator.table(len(p) + 4, runner.block_size) for p in (first, second, third)]
    runner.execute(ForwardBatch([first], [0], [tables[0]]))

    # A decode, a prompt chunk that stops short of its prompt, and a chunk that completes one.
    token_ids = [[first[-1]], second[:8], third]
    starts = [len(first) - 1, 0, 0]
    out = runner.execute(
        ForwardBatch(token_ids, starts, tables, all_logits=[False, True, False], sampled=[True, False, True])
    )
    assert out.last_logits.shape == (2, config.vocab_size)
    torch.testing.assert_close(out.last_logits[0], reference_logits(model, first)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.last_logits[1], reference_logits(model, third)[-1], atol=ATOL, rtol=0)
    chunk_logits = out.all_logits[1]  # asked for explicitly: still there
    assert chunk_logits is not None
    torch.testing.assert_close(chunk_logits, reference_logits(model, second[:8]), atol=ATOL, rtol=0)

    # A step of only unfinished chunks computes no logits at all.
    out = runner.execute(ForwardBatch([second[8:12]], [8], [tables[1]], sampled=[False]))
    assert out.last_logits.shape == (0, config.vocab_size)
    out = runner.execute(ForwardBatch([second[12:]], [12], [tables[1]]))
    torch.testing.assert_close(out.last_logits[0], reference_logits(model, second)[-1], atol=ATOL, rtol=0)


def test_prefix_reuse_two_sequences_share_blocks() -> None:
    """A second prompt with a cached prefix (shared full blocks) only computes its tail."""
    model, config = build_reference("llama")
    runner = make_runner(model, config)
    prefix = random_prompt(12, seed=5)  # three full blocks of 4
    first = [*prefix, 7, 8, 9]
    second = [*prefix, 11, 12, 13, 14, 15]
    allocator = BlockAllocator(runner.num_blocks, seed=6)
    first_table = allocator.table(len(first), runner.block_size)
    second_table = first_table[:3] + allocator.table(len(second) - 12, runner.block_size)
    runner.execute(ForwardBatch([first], [0], [first_table]))
    out = runner.execute(ForwardBatch([second[12:]], [12], [second_table], all_logits=[True]))
    reference = reference_logits(model, second)
    assert out.all_logits[0] is not None
    torch.testing.assert_close(out.all_logits[0], reference[12:], atol=ATOL, rtol=0)


def test_sliding_window_matches_mistral() -> None:
    model, config = build_reference("mistral", sliding_window=6)
    assert config.sliding_window == 6
    runner = make_runner(model, config)
    prompt = random_prompt(15, seed=7)
    table = BlockAllocator(runner.num_blocks, seed=8).table(20, runner.block_size)
    out = runner.execute(ForwardBatch([prompt[:10]], [0], [table], all_logits=[True]))
    reference = reference_logits(model, prompt[:10])
    assert out.all_logits[0] is not None
    torch.testing.assert_close(out.all_logits[0], reference, atol=ATOL, rtol=0)
    out = runner.execute(ForwardBatch([prompt[10:14]], [10], [table]))
    torch.testing.assert_close(
        out.last_logits[0], reference_logits(model, prompt[:14])[-1], atol=ATOL, rtol=0
    )
    out = runner.execute(ForwardBatch([prompt[14:15]], [14], [table]))
    torch.testing.assert_close(out.last_logits[0], reference_logits(model, prompt)[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_tracks_float32(dtype: torch.dtype) -> None:
    model, config = build_reference("qwen2")
    runner = make_runner(model, config, dtype=dtype)
    assert runner.dtype == dtype
    prompt = random_prompt(20, seed=9)
    table = BlockAllocator(runner.num_blocks).table(24, runner.block_size)
    out = runner.execute(ForwardBatch([prompt], [0], [table], all_logits=[True]))
    assert out.last_logits.dtype == torch.float32
    reference = reference_logits(model, prompt)
    assert out.all_logits[0] is not None
    scale = reference.abs().max().item()
    assert (out.all_logits[0] - reference).abs().max().item() < 0.05 * scale
    token = int(out.last_logits[0].argmax())
    out = runner.execute(ForwardBatch([[token]], [20], [table]))
    decode_reference = reference_logits(model, [*prompt, token])[-1]
    assert (out.last_logits[0] - decode_reference).abs().max().item() < 0.05 * scale


def test_kv_cache_capacity_from_memory_budget() -> None:
    model, config = build_reference("llama")
    # 2 layers x 4 tokens x (k, v) x 2 kv heads x 16 dims x 4 bytes = 2048 bytes per block.
    runner = make_runner(model, config, num_blocks=None, kv_cache_memory_bytes=2048 * 10 + 100)
    assert runner.num_blocks == 10
    assert runner.kv_cache.memory_bytes == 2048 * 10
    with pytest.raises(ValueError, match="too small"):
        make_runner(model, config, num_blocks=None, kv_cache_memory_bytes=1000)


def test_invalid_batches_and_weights_are_rejected() -> None:
    model, config = build_reference("llama")
    runner = make_runner(model, config)
    with pytest.raises(ValueError, match="block table"):
        runner.execute(ForwardBatch([list(range(9))], [0], [[0, 1]]))
    with pytest.raises(ValueError, match="max_model_len"):
        runner.execute(ForwardBatch([[1]], [config.max_position_embeddings], [list(range(70))]))
    with pytest.raises(ValueError, match="at least one token"):
        runner.execute(ForwardBatch([[]], [0], [[0]]))
    with pytest.raises(ValueError, match="outside"):
        runner.execute(ForwardBatch([[1]], [4], [[0, runner.num_blocks]]))
    with pytest.raises(ValueError, match="outside"):
        runner.execute(ForwardBatch([[1]], [0], [[-1]]))

    weights = dict(model.state_dict())
    del weights["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match=r"missing 1 weight.*layers\.1\.mlp\.down_proj"):
        ModelRunner(config, weights.items(), num_blocks=4)
    weights = dict(model.state_dict())
    weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="does not fit"):
        ModelRunner(config, weights.items(), num_blocks=4)
    unknown = ModelConfig(**{**config.__dict__, "architecture": "rwkv"})
    with pytest.raises(ValueError, match="unsupported model architecture"):
        ModelRunner(unknown, model.state_dict().items(), num_blocks=4)
