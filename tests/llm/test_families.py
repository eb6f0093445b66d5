"""Every non-Llama family against transformers on a tiny random checkpoint written to disk.

Adding a family is one ``FAMILIES`` entry (its transformers config kwargs): logits within 1e-4 at
prefill, at every decode step, for chunked prefill and a mixed prefill+decode batch over shuffled
blocks; greedy text equal to ``generate``; prefix-cache hits and preemption give the same outputs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from servekit.llm import EngineConfig, LLMEngine, SamplingParams
from servekit.llm.inputs import InputProcessor
from servekit.llm.loaders import ModelSource, load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner
from tests.llm.tiny_models import LLAMA_LIKE, build_family_checkpoint

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256}

MLA = {
    **LLAMA_LIKE,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 12,
    "moe_intermediate_size": 16,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
}
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "gpt_bigcode": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "multi_query": True},
    "gpt_neox": {**SMALL, "intermediate_size": 96, "rotary_pct": 0.5},
    "phi": {**SMALL, "intermediate_size": 96, "partial_rotary_factor": 0.5},
    "stablelm": {**LLAMA_LIKE, "partial_rotary_factor": 0.25, "use_qkv_bias": True},
    "gemma": {**LLAMA_LIKE, "head_dim": 16},
    "gemma2": {**LLAMA_LIKE, "head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 12},
    "gemma3_text": {
        **LLAMA_LIKE,
        "head_dim": 16,
        "sliding_window": 5,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "mixtral": {**LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        **LLAMA_LIKE,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
    },
    "phi3": {
        **LLAMA_LIKE,
        "original_max_position_embeddings": 64,
        "rope_scaling": {
            "rope_type": "longrope",
            "short_factor": [1.0 + i / 8 for i in range(8)],
            "long_factor": [2.0] * 8,
        },
    },
    "starcoder2": {**LLAMA_LIKE, "sliding_window": 6},
    "olmo2": LLAMA_LIKE,
    "gptj": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 8},
    "glm4": {**LLAMA_LIKE, "partial_rotary_factor": 0.5},
    "opt": {**SMALL, "ffn_dim": 96, "word_embed_proj_dim": 64},
    "bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4},
    "mpt": {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 256, "expansion_ratio": 2},
    "falcon": {**SMALL, "multi_query": True, "parallel_attn": True, "bias": False},
    "falcon-new": {**SMALL, "new_decoder_architecture": True, "num_kv_heads": 2, "bias": True},
    "deepseek_v2": {
        **MLA,
        "q_lora_rank": None,
        "topk_method": "group_limited_greedy",
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 1.5,
    },
    "deepseek_v3": {**MLA, "q_lora_rank": 24, "n_group": 2, "topk_group": 1},
    "qwen3_moe": {
        **LLAMA_LIKE,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
    },
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    model_type: str = request.param.split("-")[0]
    directory = build_family_checkpoint(
        tmp_path_factory.mktemp(model_type), model_type, FAMILIES[request.param]
    )
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), attn_implementation="eager", dtype=torch.float32
    ).eval()
    return directory, reference


def reference_logits(model: Any, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def shuffled_tables(num_blocks: int, block_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    return [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]


def test_logits_match_transformers(family: tuple[Path, Any]) -> None:
    directory, reference = family
    source = load_model_source(str(directory))
    runner = ModelRunner(source.config, source.iter_weights(), block_size=4, num_blocks=64, max_model_len=64)
    rng = random.Random(0)
    vocab = source.config.vocab_size
    first = [rng.randrange(vocab) for _ in range(21)]
    second = [rng.randrange(vocab) for _ in range(17)]
    table_a, table_b = shuffled_tables(64, 4, [21 + 8, 17 + 8], seed=1)

    out = runner.execute(ForwardBatch([first], [0], [table_a], all_logits=[True]))
    assert out.all_logits[0] is not None
    torch.testing.assert_close(out.all_logits[0], reference_logits(reference, first), atol=ATOL, rtol=0)

    # Decode `first` while `second` is prefilled in chunks beside it (a chunk of one token included).
    chunks = [(0, 6), (6, 7), (7, 13), (13, 17)]
    for start, end in chunks:
        first.append(int(out.last_logits[0].argmax()))
        out = runner.execute(
            ForwardBatch(
                [second[start:end], [first[-1]]], [start, len(first) - 1], [table_b, table_a], [True, False]
            )
        )
        chunk_logits = out.all_logits[0]
        assert chunk_logits is not None
        torch.testing.assert_close(
            chunk_logits, reference_logits(reference, second[:end])[start:end], atol=ATOL, rtol=0
        )
        torch.testing.assert_close(
            out.last_logits[1], reference_logits(reference, first)[-1], atol=ATOL, rtol=0
        )


PROMPTS = ["Hello, world! How are you today?", "def generate(prompt: str) -> str:", "Numbers: 0 1 2 3"]
SYSTEM = "Once upon a time, there was a small model that wanted to serve many requests at the same time. "
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def run(source: ModelSource, prompts: list[str], **settings: Any) -> tuple[list[list[int]], Any]:
    config: dict[str, Any] = {"max_model_len": 64, "block_size": 8, "num_kv_blocks": 64}
    config.update(settings)
    engine = LLMEngine(EngineConfig(**config), source=source)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, GREEDY)
        if index == 0:
            engine.step()  # the first prompt is cached before the others arrive
    finals: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output.outputs[0].token_ids
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [finals[f"r{i}"] for i in range(len(prompts))], engine.get_stats()


def test_engine_greedy_prefix_cache_and_preemption(family: tuple[Path, Any]) -> None:
    directory, reference = family
    source = load_model_source(str(directory))
    prompts = [SYSTEM + p for p in PROMPTS]
    expected = []
    for prompt in prompts:
        ids = source.tokenizer.encode(prompt)
        with torch.no_grad():
            generated = reference.generate(
                torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        expected.append(generated[0, len(ids) :].tolist())
    assert run(source, prompts, enable_prefix_caching=False)[0] == expected
    cached, stats = run(source, prompts, enable_prefix_caching=True)
    assert cached == expected and stats.prefix_cache_hit_rate > 0
    tight = {"num_kv_blocks": 16, "block_size": 4, "max_model_len": 64, "max_num_batched_tokens": 16}
    preempted, stats = run(source, prompts, **tight)
    assert preempted == expected and stats.num_preemptions > 0


# A template using what differs between families' files: the BOS/EOS tokens and the roles.
FAMILY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_special_tokens_and_eos_come_from_the_family_files(family: tuple[Path, Any]) -> None:
    """Every family reads the files as transformers does: the chat template (chat_template.jinja), the
    special tokens of tokenizer_config.json, and every EOS id of generation_config.json (there [eos,
    bos], so a family that kept only config.json's single id would fail)."""
    directory, _ = family
    (directory / "chat_template.jinja").write_text(FAMILY_TEMPLATE)
    try:
        source = load_model_source(str(directory))
        reference = transformers.AutoTokenizer.from_pretrained(str(directory))
        generation = json.loads((directory / "generation_config.json").read_text())
        assert source.config.eos_token_ids == generation["eos_token_id"]
        assert source.config.bos_token_id == generation["bos_token_id"]
        assert source.chat_template == FAMILY_TEMPLATE
        inputs = InputProcessor(source.tokenizer, source.config.vocab_size, 64, source.chat_template)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
        expected_text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert inputs.render_chat(messages) == expected_text
        expected_ids = reference(expected_text, add_special_tokens=False)["input_ids"]
        assert inputs.chat_token_ids(messages) == expected_ids
    finally:
        (directory / "chat_template.jinja").unlink()
