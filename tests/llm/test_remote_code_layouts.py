"""trust_remote_code families that are Llama under another layout (InternLM2, Baichuan, Yi, Aquila):
a tiny Llama checkpoint converted into each layout (and back, losslessly) gives transformers'
Llama logits when served from the converted directory."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from servekit.llm.loaders import load_model_source
from servekit.llm.model_runner import ModelRunner
from tests.llm.tiny_models import assert_prefill_matches_transformers, build_tiny_checkpoint

transformers = pytest.importorskip("transformers")

State = dict[str, torch.Tensor]
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def qkv_names(prefix: str) -> list[str]:
    return [f"{prefix}self_attn.{p}_proj.weight" for p in "qkv"]


def layers(state: State) -> list[str]:
    return sorted({n.rsplit("self_attn.", 1)[0] for n in state if "self_attn.q_proj" in n})


def to_internlm2(state: State) -> State:
    out: State = {
        "model.tok_embeddings.weight": state["model.embed_tokens.weight"],
        "model.norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    group = HEADS // KV_HEADS
    for prefix in layers(state):
        q, k, v = (state[n] for n in qkv_names(prefix))
        grouped = torch.cat(
            [
                q.view(KV_HEADS, group, HEAD_DIM, -1),
                k.view(KV_HEADS, 1, HEAD_DIM, -1),
                v.view(KV_HEADS, 1, HEAD_DIM, -1),
            ],
            1,
        )
        out[f"{prefix}attention.wqkv.weight"] = grouped.reshape(-1, q.shape[1])
        out[f"{prefix}attention.wo.weight"] = state[f"{prefix}self_attn.o_proj.weight"]
        for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            out[f"{prefix}feed_forward.{theirs}.weight"] = state[f"{prefix}mlp.{ours}_proj.weight"]
        out[f"{prefix}attention_norm.weight"] = state[f"{prefix}input_layernorm.weight"]
        out[f"{prefix}ffn_norm.weight"] = state[f"{prefix}post_attention_layernorm.weight"]
    return out


def from_internlm2(state: State) -> State:
    out: State = {
        "model.embed_tokens.weight": state["model.tok_embeddings.weight"],
        "model.norm.weight": state["model.norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    group = HEADS // KV_HEADS
    for prefix in sorted({n.rsplit("attention.", 1)[0] for n in state if "attention.wqkv" in n}):
        grouped = state[f"{prefix}attention.wqkv.weight"].view(KV_HEADS, group + 2, HEAD_DIM, -1)
        hidden = grouped.shape[-1]
        out[f"{prefix}self_attn.q_proj.weight"] = grouped[:, :group].reshape(-1, hidden)
        out[f"{prefix}self_attn.k_proj.weight"] = grouped[:, group].reshape(-1, hidden)
        out[f"{prefix}self_attn.v_proj.weight"] = grouped[:, group + 1].reshape(-1, hidden)
        out[f"{prefix}self_attn.o_proj.weight"] = state[f"{prefix}attention.wo.weight"]
        for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            out[f"{prefix}mlp.{ours}_proj.weight"] = state[f"{prefix}feed_forward.{theirs}.weight"]
        out[f"{prefix}input_layernorm.weight"] = state[f"{prefix}attention_norm.weight"]
        out[f"{prefix}post_attention_layernorm.weight"] = state[f"{prefix}ffn_norm.weight"]
    return out


def to_baichuan(state: State) -> State:
    out = dict(state)
    for prefix in layers(state):
        out[f"{prefix}self_attn.W_pack.weight"] = torch.cat([out.pop(n) for n in qkv_names(prefix)])
    return out


def from_baichuan(state: State) -> State:
    out = dict(state)
    for prefix in sorted({n.rsplit("self_attn.", 1)[0] for n in state if "W_pack" in n}):
        packed = out.pop(f"{prefix}self_attn.W_pack.weight")
        sizes = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
        out.update(zip(qkv_names(prefix), packed.split(sizes), strict=True))
    return out


def to_yi(state: State) -> State:
    renames = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"}
    return {next((n.replace(a, b) for a, b in renames.items() if a in n), n): t for n, t in state.items()}


def from_yi(state: State) -> State:
    return {
        n.replace(".ln1.", ".input_layernorm.").replace(".ln2.", ".post_attention_layernorm."): t
        for n, t in state.items()
    }


LAYOUTS: dict[str, tuple[Callable[[State], State], Callable[[State], State], dict[str, Any]]] = {
    "internlm2": (to_internlm2, from_internlm2, {"architectures": ["InternLM2ForCausalLM"], "bias": False}),
    "baichuan": (to_baichuan, from_baichuan, {"architectures": ["BaichuanForCausalLM"]}),
    "yi": (to_yi, from_yi, {"architectures": ["YiForCausalLM"]}),
    "aquila": (dict, dict, {"architectures": ["AquilaForCausalLM"]}),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("llama") / "model", "llama", config_overrides={"head_dim": HEAD_DIM}
    )


@pytest.mark.parametrize("model_type", sorted(LAYOUTS))
def test_converted_llama_checkpoint_gives_llama_logits(
    model_type: str, llama_dir: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    forward, backward, extra = LAYOUTS[model_type]
    state = load_file(str(llama_dir / "model.safetensors"))
    converted = forward(state)
    restored = backward(converted)
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[n], state[n]) for n in state)

    target = tmp_path / model_type
    shutil.copytree(llama_dir, target)
    (target / "model.safetensors").unlink()
    save_file({n: t.contiguous() for n, t in converted.items()}, str(target / "model.safetensors"))
    config = json.loads((llama_dir / "config.json").read_text())
    config.update(extra, model_type=model_type)
    (target / "config.json").write_text(json.dumps(config))

    source = load_model_source(str(target))
    assert source.config.architecture == model_type
    runner = ModelRunner(source.config, source.iter_weights(), block_size=4, num_blocks=32, max_model_len=64)
    prompt = source.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert_prefill_matches_transformers(runner, llama_dir, prompt)
