"""AWQ and GPTQ checkpoints: a tiny Llama's projections quantised to 4-bit groups here, packed as each
format stores them, give the logits transformers computes with the same weights dequantised — on
the Q8_0 blocks they are repacked into and on the dequantised fallback alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from servekit.llm.kernels import kernels_available
from servekit.llm.kernels.quantized import QuantizedTensor
from servekit.llm.loaders import load_model_source
from servekit.llm.loaders.int4_groups import UnsupportedQuantization, int4_scheme
from servekit.llm.model_runner import ModelRunner
from servekit.llm.models.quantized_linear import QuantizedLinear
from tests.llm.tiny_models import assert_prefill_matches_transformers, build_tiny_checkpoint

transformers = pytest.importorskip("transformers")

State = dict[str, torch.Tensor]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column AWQ_ORDER[i] of its eight


def quantise(
    weight: torch.Tensor, group: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, z, s): 4-bit values ``[out, in]``, zero points and float16 scales ``[out, groups]``."""
    rows, cols = weight.shape
    grouped = weight.reshape(rows, cols // group, group)
    if symmetric:
        scales = (grouped.abs().amax(-1) / 7).clamp_min(1e-6).half()
        zeros = torch.full_like(scales, 8, dtype=torch.int32)
    else:
        low, high = grouped.amin(-1), grouped.amax(-1)
        scales = ((high - low) / 15).clamp_min(1e-6).half()
        zeros = (-low / scales.float()).round().clamp(1, 15).to(torch.int32)  # 1..15: also GPTQ v1's z - 1
    q = (grouped / scales.float().unsqueeze(-1)).round().to(torch.int32) + zeros.unsqueeze(-1)
    return q.clamp(0, 15).reshape(rows, cols), zeros, scales


def dequantised(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    return ((q - zeros.repeat_interleave(group, 1)) * scales.float().repeat_interleave(group, 1)).float()


def pack_columns(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """``[r, c]`` 4-bit values -> int32 ``[r, c / 8]``, nibble i holding column ``order[i]`` of each eight."""
    eights = values.reshape(values.shape[0], -1, 8)
    packed = torch.zeros(eights.shape[:2], dtype=torch.int64)
    for nibble, column in enumerate(order):
        packed |= eights[..., column].to(torch.int64) << (4 * nibble)
    return packed.to(torch.int64).where(packed < 2**31, packed - 2**32).to(torch.int32)


def pack(fmt: str, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int) -> State:
    plain = tuple(range(8))
    if fmt == "awq":
        return {
            "qweight": pack_columns(q.t(), AWQ_ORDER),
            "qzeros": pack_columns(zeros.t(), AWQ_ORDER),
            "scales": scales.t().contiguous(),
        }
    stored_zeros = zeros - 1 if fmt == "gptq" else zeros
    return {
        "qweight": pack_columns(q, plain).t().contiguous(),  # nibble j of row r: input 8r + j
        "qzeros": pack_columns(stored_zeros.t(), plain),
        "scales": scales.t().contiguous(),
        "g_idx": (torch.arange(q.shape[1]) // group).to(torch.int32),
    }


def write_quantised(source: Path, target: Path, fmt: str, group: int, symmetric: bool) -> State:
    """The checkpoint at ``source`` with its projections in ``fmt`` at ``target``; returns the state
    dict with those projections as the dequantised float weights (the reference's)."""
    state = load_file(str(source / "model.safetensors"))
    reference, stored = dict(state), {}
    for name, tensor in state.items():
        prefix = name.removesuffix(".weight")
        if not prefix.endswith(PROJECTIONS):
            stored[name] = tensor
            continue
        q, zeros, scales = quantise(tensor.float(), group, symmetric)
        reference[name] = dequantised(q, zeros, scales, group)
        stored.update(
            {f"{prefix}.{part}": value for part, value in pack(fmt, q, zeros, scales, group).items()}
        )
    shutil.copytree(source, target)
    save_file(stored, str(target / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    method = "awq" if fmt == "awq" else "gptq"
    quantization: dict[str, Any] = {"quant_method": method, "bits": 4, "group_size": group}
    if method == "awq":
        quantization.update(zero_point=True, version="gemm")
    else:
        quantization.update(sym=symmetric, desc_act=False, checkpoint_format=fmt)
    config["quantization_config"] = quantization
    (target / "config.json").write_text(json.dumps(config))
    return reference


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("llama") / "model", "llama")


CASES = [("awq", 32, False), ("awq", 64, False), ("gptq", 32, True), ("gptq_v2", 64, False)]


@pytest.mark.parametrize(("fmt", "group", "symmetric"), CASES)
@pytest.mark.parametrize("on_blocks", [True, False], ids=["blocks", "dequantised"])
def test_quantised_checkpoint_gives_the_dequantised_logits(
    fmt: str, group: int, symmetric: bool, on_blocks: bool, llama_dir: Path, tmp_path: Path
) -> None:
    if on_blocks and not kernels_available(torch.float32):
        pytest.skip("the C kernels are not built here")
    torch.set_num_threads(1)
    reference_state = write_quantised(llama_dir, tmp_path / fmt, fmt, group, symmetric)
    source = load_model_source(str(tmp_path / fmt))
    assert source.quantization == f"{fmt[:4].upper()} 4-bit, group {group}"
    weights = source.iter_weight_blocks() if on_blocks else source.iter_weights()
    runner = ModelRunner(source.config, weights, block_size=4, num_blocks=32, max_model_len=64)
    projections = [
        p
        for block in runner.model.blocks
        for part in (block.attention, block.mlp)
        for p in vars(part).values()
        if hasattr(p, "in_features")
    ]
    assert projections and all(
        (isinstance(p, QuantizedLinear) and p.on_gguf_blocks()) == on_blocks for p in projections
    )

    reference_dir = tmp_path / "reference"
    shutil.copytree(llama_dir, reference_dir)
    save_file(reference_state, str(reference_dir / "model.safetensors"))
    prompt = source.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert_prefill_matches_transformers(runner, reference_dir, prompt)


@pytest.mark.parametrize(("fmt", "symmetric", "ggml_type"), [("awq", False, 8), ("gptq", True, 2)])
def test_blocks_are_the_exact_weights(
    fmt: str, symmetric: bool, ggml_type: int, llama_dir: Path, tmp_path: Path
) -> None:
    """Asymmetric groups become Q8_0 blocks; symmetric ones (zero point 8) the smaller Q4_0."""
    reference_state = write_quantised(llama_dir, tmp_path / fmt, fmt, 32, symmetric)
    source = load_model_source(str(tmp_path / fmt))
    blocks = {name: t for name, t in source.iter_weight_blocks() if isinstance(t, QuantizedTensor)}
    assert {n.rsplit(".", 2)[-2] for n in blocks} == set(PROJECTIONS)
    for name, tensor in blocks.items():
        assert tensor.ggml_type == ggml_type
        assert torch.equal(tensor.dequantize(), reference_state[name])


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"quant_method": "bitsandbytes"}, "supported: AWQ"),
        ({"quant_method": "awq", "bits": 8, "group_size": 128}, "only 4-bit"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 48}, "multiple of 32"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "only 'gemm'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero points"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "marlin"),
    ],
)
def test_schemes_that_cannot_be_computed_exactly_are_refused(
    quantization: dict[str, Any], message: str
) -> None:
    with pytest.raises(UnsupportedQuantization, match=message):
        int4_scheme({"quantization_config": quantization})


def test_act_order_that_interleaves_groups_is_refused(llama_dir: Path, tmp_path: Path) -> None:
    write_quantised(llama_dir, tmp_path / "gptq", "gptq", 32, True)
    state = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    name = next(n for n in state if n.endswith("g_idx"))
    state[name] = state[name].flip(0).contiguous()  # groups of 32 in reverse: fine
    save_file(state, str(tmp_path / "gptq" / "model.safetensors"))
    list(load_model_source(str(tmp_path / "gptq")).iter_weight_blocks())
    state[name] = (torch.arange(state[name].numel()) % 2).to(torch.int32)  # alternate channels: not
    save_file(state, str(tmp_path / "gptq" / "model.safetensors"))
    with pytest.raises(UnsupportedQuantization, match="act-order"):
        list(load_model_source(str(tmp_path / "gptq")).iter_weight_blocks())


def test_the_engine_computes_an_awq_checkpoint_on_its_blocks(llama_dir: Path, tmp_path: Path) -> None:
    """Greedy text from the engine (on the repacked blocks) equals transformers' on the dequantised weights."""
    from servekit.llm import LLM, SamplingParams

    reference_state = write_quantised(llama_dir, tmp_path / "awq", "awq", 32, False)
    reference_dir = tmp_path / "reference"
    shutil.copytree(llama_dir, reference_dir)
    save_file(reference_state, str(reference_dir / "model.safetensors"))
    llm = LLM(str(tmp_path / "awq"), max_model_len=128, num_kv_blocks=32, block_size=16)
    assert llm.engine.gguf_blocks is kernels_available(torch.float32)
    prompt = llm.get_tokenizer().encode("Once upon a time")
    output = llm.generate(
        {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(reference_dir)).eval()
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :]
    assert output[0].outputs[0].token_ids == expected.tolist()


def test_quantization_awq_or_gptq_checks_the_checkpoint(llama_dir: Path, tmp_path: Path) -> None:
    """vLLM's ``quantization="awq"`` names the checkpoint's method: accepted when it is so, refused otherwise."""
    from servekit.llm.config import EngineConfigError, resolve_quantization

    write_quantised(llama_dir, tmp_path / "awq", "awq", 32, False)
    scheme = load_model_source(str(tmp_path / "awq")).quantization
    assert resolve_quantization("awq", scheme) is None  # computed as stored, not requantised
    with pytest.raises(EngineConfigError, match="this one is AWQ 4-bit"):
        resolve_quantization("gptq", scheme)
    with pytest.raises(EngineConfigError, match="not quantised"):
        resolve_quantization("awq", None)
