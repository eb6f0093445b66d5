"""int8 quantization (Int8Linear, engine option) and a KV cache narrower than the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from servekit.llm import EngineConfig, SamplingParams
from servekit.llm.config import EngineConfigError, resolve_kv_cache_dtype, resolve_quantization
from servekit.llm.kernels import kernels_available
from servekit.llm.kernels.quantized import QuantizedTensor, q8_matmul
from servekit.llm.loaders import ModelSource, load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner
from servekit.llm.models import linear
from servekit.llm.models.linear import Int8Linear
from servekit.llm.models.quantized_linear import INT8_FROM_ROWS, QuantizedLinear
from tests.llm.test_engine import PROMPTS, SYSTEM, make_engine, run_all
from tests.llm.test_loaders_gguf import write_gguf
from tests.llm.test_native_decode import mixed_type
from tests.llm.test_quantized_kernels import random_blocks
from tests.llm.tiny_models import build_tiny_checkpoint


@pytest.fixture(autouse=True)
def _one_thread_and_int8_on_any_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests check int8's arithmetic, which runs (slowly) on CPUs without an int8 unit too."""
    torch.set_num_threads(1)
    monkeypatch.setenv(linear.INT8_ANY_CPU_ENV, "1")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return load_model_source(str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-q") / "model")))


@pytest.mark.parametrize("fused", [True, False])
def test_int8_linear_tracks_float_and_ignores_batch_mates(fused: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn((96, 200), generator=generator) * 0.05
    bias = torch.randn(96, generator=generator)
    layer = Int8Linear(weight, bias)
    layer.fused = layer.fused and fused
    x = torch.randn((9, 200), generator=generator) * torch.linspace(0.1, 10, 9).unsqueeze(1)
    reference = torch.nn.functional.linear(x, weight, bias)
    out = layer(x)
    assert ((out - reference).norm(dim=1) / reference.norm(dim=1)).max() < 0.02
    for row in range(x.shape[0]):  # each token's result is bitwise the same alone as in the batch
        assert torch.equal(layer(x[row : row + 1]), out[row : row + 1])
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_int8_runner_logits_track_float32(source: ModelSource) -> None:
    def runner(**kwargs: Any) -> ModelRunner:
        return ModelRunner(source.config, source.iter_weights(), num_blocks=32, block_size=8, **kwargs)

    prompt = source.tokenizer.encode(PROMPTS[1])
    table = list(range((len(prompt) + 7) // 8))
    exact = runner().execute(ForwardBatch([prompt], [0], [table], all_logits=[True])).all_logits[0]
    quantised = runner(quantization="int8").execute(ForwardBatch([prompt], [0], [table], all_logits=[True]))
    got = quantised.all_logits[0]
    assert exact is not None and got is not None
    similarity = torch.nn.functional.cosine_similarity(got, exact, dim=-1)
    assert similarity.min() > 0.99
    assert not torch.equal(got, exact)  # it really is a different (quantised) computation


def test_int8_engine_is_reproducible_regardless_of_batch_mates(source: ModelSource) -> None:
    params = SamplingParams(temperature=0.9, seed=77, max_tokens=12, ignore_eos=True)
    alone = run_all(make_engine(source, quantization="int8"), [(PROMPTS[2], params)])["r0"]
    mates = [(p, SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)) for p in PROMPTS]
    mates.insert(2, (PROMPTS[2], params))
    crowded = run_all(make_engine(source, quantization="int8", max_num_batched_tokens=9), mates)["r2"]
    assert crowded.outputs[0].token_ids == alone.outputs[0].token_ids
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    text = run_all(make_engine(source, quantization="int8"), [(PROMPTS[0], greedy)])["r0"].outputs[0]
    assert len(text.token_ids) == 8


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_narrow_kv_cache_tracks_float32_and_prefix_hits_change_nothing(
    source: ModelSource, kv_dtype: str
) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    requests = [(SYSTEM + p, greedy) for p in PROMPTS[:3]]
    exact = run_all(make_engine(source, enable_prefix_caching=False), requests)
    fresh = run_all(make_engine(source, kv_cache_dtype=kv_dtype, enable_prefix_caching=False), requests)
    cached_engine = make_engine(source, kv_cache_dtype=kv_dtype, max_num_seqs=1)  # one by one: later ones hit
    cached = run_all(cached_engine, requests)
    assert cached_engine.runner.kv_cache.dtype == getattr(torch, kv_dtype)
    assert cached_engine.get_stats().prefix_cache_hit_rate > 0
    for rid in exact:
        narrow, reused = fresh[rid].outputs[0], cached[rid].outputs[0]
        assert narrow.token_ids == reused.token_ids
        assert narrow.cumulative_logprob == pytest.approx(reused.cumulative_logprob, abs=1e-4)
        assert narrow.cumulative_logprob == pytest.approx(exact[rid].outputs[0].cumulative_logprob, abs=0.05)


def test_quantization_and_kv_cache_dtype_settings() -> None:
    assert EngineConfig(quantization="INT8").quantization == "int8"
    assert EngineConfig(quantization="none").quantization is None
    assert EngineConfig().quantization is None  # exact by default; int8 and auto are asked for
    assert EngineConfig(kv_cache_dtype="bf16").kv_cache_dtype == "bfloat16"
    with pytest.raises(EngineConfigError) as error:
        EngineConfig(quantization="int3")
    assert error.value.name == "quantization"
    with pytest.raises(EngineConfigError) as error:
        EngineConfig(kv_cache_dtype="int4")
    assert error.value.name == "kv_cache_dtype"
    assert EngineConfig.from_env({"SERVEKIT_QUANTIZATION": "int8"}).quantization == "int8"


@pytest.mark.parametrize(
    ("flags", "unit"),
    [
        ({"avx2", "fma"}, None),
        ({"avx2", "avx512f", "avx512_vnni"}, "avx512_vnni"),
        ({"amx_int8"}, "amx_int8"),
    ],
)
def test_int8_is_chosen_only_on_cpus_with_an_int8_unit(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], unit: str | None
) -> None:
    monkeypatch.delenv(linear.INT8_ANY_CPU_ENV)
    monkeypatch.setattr(linear, "cpu_flags", lambda: flags)
    assert linear.int8_dot_product_unit() == unit
    if unit is None:
        assert resolve_quantization("auto", "Q4_1") is None  # never a slowdown by default
        with pytest.raises(EngineConfigError, match="int8 dot-product unit") as error:
            resolve_quantization("int8", None)
        assert error.value.name == "quantization"
    else:
        assert resolve_quantization("auto", "Q4_1") == "int8"
        assert resolve_quantization("int8", None) == "int8"


def test_auto_quantization_follows_the_checkpoint(source: ModelSource) -> None:
    assert resolve_quantization("auto", "Q4_1, Q8_0") == "int8"  # a quantised GGUF, on a CPU
    assert resolve_quantization("auto", None) is None  # float weights are computed as they are
    assert resolve_quantization(None, "Q4_1") is None
    assert resolve_kv_cache_dtype("auto", torch.float32, "int8") == torch.bfloat16
    assert resolve_kv_cache_dtype("auto", torch.float32, None) == torch.float32
    assert resolve_kv_cache_dtype("float16", torch.float32, "int8") == torch.float16
    engine = make_engine(source, quantization="auto")  # a float checkpoint: auto computes it as stored
    assert engine.quantization is None and engine.runner.kv_cache.dtype == torch.float32


def test_int8_checkpoint_directory_round_trip(tmp_path: Path) -> None:
    """The option works on a Hugging Face directory with biases (Qwen2-style) too."""
    checkpoint = build_tiny_checkpoint(tmp_path / "qwen2", arch="qwen2")
    engine = make_engine(load_model_source(str(checkpoint)), quantization="int8")
    out = run_all(engine, [(PROMPTS[3], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))])
    assert len(out["r0"].outputs[0].token_ids) == 5


@pytest.mark.skipif(not kernels_available(torch.float32), reason="no C compiler")
def test_int8_on_gguf_blocks_few_rows_in_8_bit_activations_then_int8_linear() -> None:
    """A projection on GGUF blocks in int8 mode: fewer than INT8_FROM_ROWS rows of x on the blocks with
    8-bit activations (q8_matmul; K-quant parts exact), from INT8_FROM_ROWS rows the Int8Linear of the
    dequantised weight."""
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    shapes = ((Q.Q4_1, 48), (Q.Q8_0, 32), (Q.Q6_K, 16))
    parts = [
        QuantizedTensor(torch.from_numpy(random_blocks(qtype, rows, 256, seed=rows)), int(qtype), (rows, 256))
        for qtype, rows in shapes
    ]
    bias = torch.randn(96, generator=torch.Generator().manual_seed(1))
    exact, mixed = QuantizedLinear(parts, bias), QuantizedLinear(parts, bias, int8=True)
    weight = torch.cat([part.dequantize() for part in parts])
    x = torch.randn((INT8_FROM_ROWS + 3, 256), generator=torch.Generator().manual_seed(2))
    for rows in range(1, INT8_FROM_ROWS):
        one = mixed(x[:rows])
        q4, q8 = (
            q8_matmul(x[:rows], p.blocks, p.ggml_type, bias[a:b])
            for p, (a, b) in zip(parts, ((0, 48), (48, 80)), strict=False)
        )
        assert torch.equal(one, torch.cat([q4, q8, exact(x[:rows])[:, 80:]], dim=1))
    out = mixed(x)
    assert torch.equal(out, Int8Linear(weight, bias)(x))
    reference = torch.nn.functional.linear(x, weight, bias)
    assert not torch.allclose(out, reference, atol=1e-4)  # really int8 ...
    assert ((out - reference).norm(dim=1) / reference.norm(dim=1)).max() < 0.02  # ... and close


@pytest.mark.skipif(not kernels_available(torch.float32), reason="no C compiler")
def test_int8_gguf_runner_keeps_the_native_step_and_int8_numbers(tmp_path: Path) -> None:
    """int8 on a GGUF checkpoint: the batch-1 decode step is the native (exact) one, and a prompt's
    logits are those of int8 on the dequantised weights (what the mode computed before)."""
    pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    write_gguf(build_tiny_checkpoint(tmp_path / "hf", "llama"), path, "llama", block_type=mixed_type)
    source = load_model_source(str(path))

    def runner(blocks: bool) -> ModelRunner:
        weights = source.iter_weight_blocks() if blocks else source.iter_weights()
        return ModelRunner(
            source.config, weights, block_size=4, num_blocks=8, max_model_len=32, quantization="int8"
        )

    on_blocks, dequantised = runner(True), runner(False)
    assert on_blocks.native_decode is not None and dequantised.native_decode is None
    prompt, table = [5, 9, 2, 7, 11, 3], [0, 1]
    logits = [
        r.execute(ForwardBatch([prompt], [0], [table], all_logits=[True])).all_logits[0]
        for r in (on_blocks, dequantised)
    ]
    assert logits[0] is not None and logits[1] is not None
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)
    # A batch-1 step: the native call computes what the model's forward (one-row q8_matmul) does.
    native = on_blocks.execute(ForwardBatch([[4]], [len(prompt)], [table])).last_logits
    on_blocks.native_decode = None
    forward = on_blocks.execute(ForwardBatch([[4]], [len(prompt)], [table])).last_logits
    torch.testing.assert_close(native, forward, rtol=0, atol=1e-4)
