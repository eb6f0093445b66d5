"""Structured output: grammar masks from xgrammar make even random weights write valid JSON / tool calls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar

from servekit.llm import LLM, SamplingParams
from servekit.llm.sampler import Sampler, make_generator
from servekit.llm.structured import (
    GrammarLogitsProcessor,
    StructuredOutputError,
    grammar_compiler_for,
    json_object_processor,
    json_schema_processor,
    tool_call_processor,
)
from servekit.llm.structured_vocab import detect_vocab_type, tokenizer_info
from servekit.llm.tokenizer import Tokenizer
from tests.llm.tiny_models import SAMPLE_TEXTS, build_sentencepiece_tokenizer_dir, build_tiny_checkpoint

torch.set_num_threads(1)

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "member", "colour"],
    "additionalProperties": False,
}

WEATHER_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
TOOL_SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in WEATHER_TOOLS}
SEEDS = range(4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("structured") / "llama")


@pytest.fixture(scope="module")
def tiny_llm(checkpoint: Path) -> LLM:
    return LLM(str(checkpoint), max_model_len=1024, num_kv_blocks=256, block_size=16)


def generate(llm: LLM, processor: Any, seed: int, max_tokens: int = 400, n: int = 1) -> list[Any]:
    params = SamplingParams(
        temperature=1.0, seed=seed, max_tokens=max_tokens, n=n, logits_processors=[processor]
    )
    return llm.generate("Describe a person:", params)[0].outputs


# -- the vocabulary as xgrammar sees it ---------------------------------------------------------


def literal_matcher(compiler: xgrammar.GrammarCompiler, text: str) -> xgrammar.GrammarMatcher:
    return xgrammar.GrammarMatcher(
        compiler.compile_grammar(f"root ::= {json.dumps(text, ensure_ascii=False)}")
    )


@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback"])
def test_every_encoding_of_a_text_is_accepted_by_its_literal_grammar(
    kind: str, checkpoint: Path, tmp_path: Path
) -> None:
    """xgrammar decodes our token ids to the same bytes as the tokenizer does (encoding detected right)."""
    if kind == "byte_level":
        tokenizer = Tokenizer.from_dir(checkpoint)
        expected = xgrammar.VocabType.BYTE_LEVEL
    else:
        tokenizer = Tokenizer.from_dir(build_sentencepiece_tokenizer_dir(tmp_path / "sp"))
        expected = xgrammar.VocabType.BYTE_FALLBACK
    assert detect_vocab_type(tokenizer)[0] == expected
    compiler = xgrammar.GrammarCompiler(tokenizer_info(tokenizer), max_threads=1)
    for text in SAMPLE_TEXTS:
        if not text.strip() or "<|" in text:
            continue
        # As generated after a prompt: a SentencePiece-style leading "▁" is a real space there.
        prompt = tokenizer.encode("Hi", add_special_tokens=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        generated_text = tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)) :]
        matcher = literal_matcher(compiler, generated_text)
        assert all(matcher.accept_token(token_id) for token_id in ids), text
        assert matcher.is_completed(), text


def test_special_tokens_are_never_text_and_eos_ends_a_complete_match(checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_dir(checkpoint)
    processor = json_object_processor(tokenizer)
    logits = torch.zeros(tokenizer.vocab_size + 7)  # the model's vocab may be padded past the tokenizer's
    output = tokenizer.encode('{"a": "', add_special_tokens=False)
    allowed = set(torch.isfinite(processor(output, logits.clone())).nonzero().flatten().tolist())
    assert allowed
    assert not allowed & set(tokenizer.all_special_ids)
    assert max(allowed) < tokenizer.vocab_size
    assert all(tokenizer.decode([t]) != '"' or t in allowed for t in range(tokenizer.vocab_size))

    output += tokenizer.encode('x"}', add_special_tokens=False)
    allowed = set(torch.isfinite(processor(output, logits.clone())).nonzero().flatten().tolist())
    assert allowed == set(tokenizer.eos_token_ids)
    assert processor.is_completed(output)


# -- generation with a tiny random model ----------------------------------------------------------


def test_json_schema_output_is_valid_for_random_weights(tiny_llm: LLM) -> None:
    processor_cache = grammar_compiler_for(tiny_llm.tokenizer)
    for seed in SEEDS:
        completion = generate(tiny_llm, json_schema_processor(tiny_llm.tokenizer, PERSON_SCHEMA), seed)[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), PERSON_SCHEMA)
    before = len(processor_cache)
    json_schema_processor(tiny_llm.tokenizer, json.loads(json.dumps(PERSON_SCHEMA)))
    assert len(processor_cache) == before  # compiled once per schema


def test_json_object_output_is_a_json_object(tiny_llm: LLM) -> None:
    finished = 0
    for seed in SEEDS:
        completion = generate(tiny_llm, json_object_processor(tiny_llm.tokenizer), seed, max_tokens=600)[0]
        assert completion.text.lstrip().startswith("{")
        if completion.finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(completion.text), dict)
    assert finished >= len(SEEDS) // 2


def test_unconstrained_random_output_is_not_json(tiny_llm: LLM) -> None:
    """The control: without the processor the same requests do not produce JSON."""
    outputs = tiny_llm.generate("Describe a person:", SamplingParams(temperature=1.0, seed=0, max_tokens=64))
    with pytest.raises(ValueError):
        json.loads(outputs[0].outputs[0].text)


def test_n_choices_sharing_one_processor_each_get_their_own_matcher(tiny_llm: LLM) -> None:
    completions = generate(tiny_llm, json_schema_processor(tiny_llm.tokenizer, PERSON_SCHEMA), 7, n=3)
    assert len(completions) == 3
    for completion in completions:
        jsonschema.validate(json.loads(completion.text), PERSON_SCHEMA)


@pytest.mark.parametrize("tool_name", ["get_weather", "add", None])
def test_hermes_tool_call_is_a_valid_call(tiny_llm: LLM, tool_name: str | None) -> None:
    for seed in SEEDS:
        processor = tool_call_processor(
            tiny_llm.tokenizer, WEATHER_TOOLS, tool_name=tool_name, style="hermes"
        )
        completion = generate(tiny_llm, processor, seed)[0]
        assert completion.finish_reason == "stop", completion.text
        text = completion.text
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>"), text
        call = json.loads(text[len("<tool_call>\n") : -len("\n</tool_call>")])
        assert set(call) == {"name", "arguments"}
        assert call["name"] == tool_name if tool_name else call["name"] in TOOL_SCHEMAS
        jsonschema.validate(call["arguments"], TOOL_SCHEMAS[call["name"]])


def test_llama3_tool_call_is_a_valid_call(tiny_llm: LLM) -> None:
    for seed in SEEDS:
        processor = tool_call_processor(tiny_llm.tokenizer, WEATHER_TOOLS, tool_name="add", style="llama3")
        call = json.loads(generate(tiny_llm, processor, seed)[0].text)
        assert call["name"] == "add"
        jsonschema.validate(call["parameters"], TOOL_SCHEMAS["add"])


# -- errors ---------------------------------------------------------------------------------------


def test_invalid_requests_name_their_parameter(checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_dir(checkpoint)
    with pytest.raises(StructuredOutputError) as bad_schema:
        json_schema_processor(tokenizer, {"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    assert bad_schema.value.param == "response_format"
    with pytest.raises(StructuredOutputError) as bad_tool:
        tool_call_processor(tokenizer, WEATHER_TOOLS, tool_name="missing", style="hermes")
    assert bad_tool.value.param == "tool_choice"
    with pytest.raises(StructuredOutputError) as no_tools:
        tool_call_processor(tokenizer, [], tool_name=None, style="hermes")
    assert no_tools.value.param == "tools"
    with pytest.raises(StructuredOutputError):
        tool_call_processor(tokenizer, WEATHER_TOOLS, tool_name=None, style="unknown-style")


# -- the sampler hook -----------------------------------------------------------------------------


class _State:
    def __init__(self, params: SamplingParams, output: list[int]) -> None:
        self.sampling_params = params
        self.prompt_token_ids = [1, 2]
        self.output_token_ids = output
        self.generator = make_generator(params.seed)


def test_sampler_applies_each_rows_processors_first_and_only_to_that_row() -> None:
    seen: list[tuple[list[int], int]] = []

    def only_token_5(output: list[int], row: torch.Tensor) -> torch.Tensor:
        seen.append((list(output), row.dim()))
        masked = torch.full_like(row, float("-inf"))
        masked[5] = row[5]
        return masked

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    constrained = SamplingParams(
        temperature=1.0, seed=1, logit_bias={7: 100.0}, logits_processors=[only_token_5]
    )
    free = SamplingParams(temperature=0.0)
    states = [_State(free, [9]), _State(constrained, [3, 4]), _State(free, [])]
    sampled = Sampler([0]).sample(logits, states)
    assert sampled[1].token_id == 5  # the bias (applied after the processor) cannot revive token 7
    assert [s.token_id for s in (sampled[0], sampled[2])] == logits[[0, 2]].argmax(dim=-1).tolist()
    assert seen == [([3, 4], 1)]


def test_grammar_processor_masks_in_place_on_a_row_view(checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_dir(checkpoint)
    processor = json_object_processor(tokenizer)
    assert isinstance(processor, GrammarLogitsProcessor)
    batch = torch.zeros(2, tokenizer.vocab_size)
    processor([], batch[1])
    assert torch.isinf(batch[1]).any() and not torch.isinf(batch[0]).any()
