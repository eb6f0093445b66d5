"""End-to-end generation throughput: servekit's LLM engine against transformers ``generate``, same run.

Workload (SmolLM2-135M-Instruct, the bundled GGUF, dequantised): ``--num-prompts`` prompts of mixed
lengths, each generating exactly ``--max-tokens`` tokens (greedy, eos ignored).

* engine: every prompt submitted at once to ``LLMEngine`` (continuous batching, chunked prefill).
* transformers: ``generate`` on the same prompts as one static, left-padded batch, in float32 and
  in bfloat16.
* batch-1 decode: a single prompt through both.

Also reports the engine's per-step overhead (step time outside the model forward).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_engine.py [--threads 2] [--num-prompts 32] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from servekit.host_memory import keep_freed_memory
from servekit.llm.config import EngineConfig
from servekit.llm.engine import LLMEngine
from servekit.llm.loaders import ModelSource, load_model_source
from servekit.llm.sampling_params import SamplingParams

TEXT = (
    "Continuous batching lets a serving engine add new requests to a running batch at every step, "
    "instead of waiting for the slowest sequence of a static batch to finish. Paged attention stores "
    "the keys and values of every sequence in fixed-size blocks, so memory is allocated as tokens "
    "arrive and shared prefixes can be reused. "
) * 8


@dataclass
class Result:
    name: str
    seconds: float
    generated_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds


def shared_allocator() -> str:
    """Set the C allocator for both sides of an in-process comparison, before either runs: the
    engine raises glibc's mmap and trim thresholds when it starts (``servekit.host_memory``), which
    speeds transformers' batched forward up too, so whichever side ran first would otherwise run
    under other settings. Returns what the report should say of it."""
    if keep_freed_memory():
        return "glibc thresholds raised (servekit.host_memory)"
    return "the environment's (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_)"


def make_prompts(source: ModelSource, count: int) -> list[list[int]]:
    """Mixed lengths between 16 and ~256 tokens, deterministic."""
    ids = source.tokenizer.encode(TEXT, add_special_tokens=False)
    lengths = [16 + (index * 37) % 241 for index in range(count)]
    return [ids[index % 7 : index % 7 + length] for index, length in enumerate(lengths)]


def run_engine(
    source: ModelSource, prompts: list[list[int]], max_tokens: int, setup: str
) -> tuple[Result, Any]:
    """``setup``: a dtype, then optionally ``+int8`` (int8 quantization) and ``+kv:<dtype>`` (the KV
    cache's dtype), e.g. ``float32+int8+kv:bfloat16`` (what ``quantization="auto"`` picks for the
    default GGUF). Without ``+int8`` the weights are computed dequantised, as stored."""
    dtype, *options = setup.split("+")
    kv_dtype = next((o.removeprefix("kv:") for o in options if o.startswith("kv:")), "auto")
    max_len = max(len(p) for p in prompts) + max_tokens + 16
    config = EngineConfig(
        dtype=dtype,
        quantization="int8" if "int8" in options else None,
        kv_cache_dtype=kv_dtype,
        max_model_len=max_len,
        max_num_seqs=max(len(prompts), 1),
    )
    engine = LLMEngine(config, source=source)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    # Warm-up (first-call allocations), not timed.
    engine.add_request("warmup", prompt_token_ids=prompts[0][:8], params=SamplingParams(max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()
    warm = engine.get_stats()
    started = time.perf_counter()
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt_token_ids=prompt, params=params)
    generated = 0
    while engine.has_unfinished_requests():
        for output in engine.step(final_only=True):
            generated += len(output.outputs[0].token_ids)
    seconds = time.perf_counter() - started
    stats = engine.get_stats()
    steps = stats.num_steps - warm.num_steps
    overhead = (stats.step_time_s - warm.step_time_s) - (stats.forward_time_s - warm.forward_time_s)
    label = f"servekit engine {setup} (batch {len(prompts)})"
    del engine
    gc.collect()
    return Result(label, seconds, generated), (steps, overhead)


def hf_model(source: ModelSource, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = source.config
    config = LlamaConfig(  # type: ignore[call-arg]  # rope_theta goes through **kwargs in transformers 5
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    model: Any = LlamaForCausalLM(config)
    model.load_state_dict({name: t.float() for name, t in source.iter_weights()}, strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()


def static_generate(model: Any, prompts: list[list[int]], max_tokens: int, pad: int) -> tuple[float, Any]:
    """transformers ``generate`` on ``prompts`` as one left-padded batch: (seconds, new token ids)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": max_tokens,
        "do_sample": False,
        "pad_token_id": pad,
    }
    with torch.no_grad():
        model.generate(input_ids[:, -8:], attention_mask=mask[:, -8:], max_new_tokens=2, do_sample=False)
        started = time.perf_counter()
        out = model.generate(input_ids, attention_mask=mask, **kwargs)
        seconds = time.perf_counter() - started
    return seconds, out[:, width:]


def run_transformers(
    source: ModelSource, prompts: list[list[int]], max_tokens: int, dtype: torch.dtype
) -> tuple[Result, list[list[int]]]:
    model = hf_model(source, dtype)
    seconds, generated = static_generate(model, prompts, max_tokens, source.tokenizer.pad_token_id or 0)
    name = f"transformers generate {str(dtype).removeprefix('torch.')} (static batch {len(prompts)})"
    del model
    gc.collect()
    return Result(name, seconds, generated.numel()), generated.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--engine-setups",
        default="float32,bfloat16,float32+int8+kv:float32,float32+int8+kv:bfloat16",
        help="engine runs: a dtype, then optionally +int8 (int8 weights and activations) and +kv:<dtype>",
    )
    parser.add_argument("--batch1-setups", default="float32,bfloat16,float32+int8+kv:bfloat16")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    source = load_model_source(None)
    prompts = make_prompts(source, args.num_prompts)
    print(
        f"model {source.name}, {torch.get_num_threads()} torch threads, torch {torch.__version__};"
        f" allocator for both sides: {shared_allocator()}"
    )
    print(
        f"workload: {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"{args.max_tokens} output tokens each (greedy, eos ignored)\n"
    )

    results: dict[str, Result] = {}
    for setup in args.engine_setups.split(","):
        result, (steps, overhead) = run_engine(source, prompts, args.max_tokens, setup)
        results[f"engine-{setup}"] = result
        print(f"{result.name:48s} {result.tokens_per_second:8.1f} tok/s  ({result.seconds:.1f} s)")
        print(
            f"{'':48s} per-step overhead outside the forward: {1000 * overhead / max(steps, 1):.2f} ms "
            f"over {steps} steps ({100 * overhead / result.seconds:.1f}% of the time)"
        )
    for setup in args.batch1_setups.split(","):
        single, _ = run_engine(source, prompts[:1], args.max_tokens, setup)
        results[f"b1-{setup}"] = single
        print(f"{single.name:48s} {single.tokens_per_second:8.1f} tok/s  ({single.seconds:.1f} s)")

    if not args.skip_transformers:
        for dtype in (torch.float32, torch.bfloat16):
            result, _ = run_transformers(source, prompts, args.max_tokens, dtype)
            results[f"hf-{dtype}"] = result
            print(f"{result.name:48s} {result.tokens_per_second:8.1f} tok/s  ({result.seconds:.1f} s)")
        result, _ = run_transformers(source, prompts[:1], args.max_tokens, torch.float32)
        results["hf-b1"] = result
        print(f"{result.name:48s} {result.tokens_per_second:8.1f} tok/s  ({result.seconds:.1f} s)")

        print()
        for key, result in results.items():
            if key.startswith("engine-"):
                for reference, goal in (("hf-torch.float32", 3.0), ("hf-torch.bfloat16", 1.5)):
                    ratio = result.tokens_per_second / results[reference].tokens_per_second
                    print(
                        f"  {result.name:44s} vs {reference[3:]:14s} batch {ratio:5.2f}x  (goal >= {goal}x)"
                    )
            elif key.startswith("b1-"):
                ratio = result.tokens_per_second / results["hf-b1"].tokens_per_second
                print(f"  {result.name:44s} vs transformers fp32 batch 1 {ratio:5.2f}x  (goal >= 2.0x)")


if __name__ == "__main__":
    main()
