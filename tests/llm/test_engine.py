"""LLMEngine on a tiny random checkpoint: batching variants give the reference outputs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from servekit.llm import EngineConfig, LLMEngine, PromptTooLongError, RequestOutput, SamplingParams
from servekit.llm.loaders import ModelSource, load_model_source
from tests.llm.tiny_models import build_tiny_checkpoint

torch.set_num_threads(1)

PROMPTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?",
    "def generate(prompt: str, max_tokens: int = 16) -> str:",
    "Numbers: 0 1 2 3",
    "Once upon a time, there was a small model that wanted to serve many requests.",
    "Café, naïve, façade",
]
SYSTEM = "Once upon a time, there was a small model that wanted to serve many requests at the same time. "


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def source(checkpoint: Path) -> ModelSource:
    return load_model_source(str(checkpoint))


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()


def make_engine(source: ModelSource, **overrides: Any) -> LLMEngine:
    settings: dict[str, Any] = {"max_model_len": 256, "block_size": 8, "num_kv_blocks": 128}
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings), source=source)


def run_all(engine: LLMEngine, requests: list[tuple[str, SamplingParams]]) -> dict[str, RequestOutput]:
    for index, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{index}", prompt, params)
    return drain(engine)


def drain(engine: LLMEngine, max_steps: int = 5000) -> dict[str, RequestOutput]:
    finals: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return finals


def token_ids(outputs: dict[str, RequestOutput]) -> dict[str, list[list[int]]]:
    return {rid: [c.token_ids for c in out.outputs] for rid, out in sorted(outputs.items())}


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_greedy_batch_matches_transformers(source: ModelSource, hf_model: Any) -> None:
    engine = make_engine(source)
    outputs = run_all(engine, [(p, GREEDY) for p in PROMPTS])
    for index, prompt in enumerate(PROMPTS):
        ids = source.tokenizer.encode(prompt)
        with torch.no_grad():
            reference = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(ids) :].tolist()
        completion = outputs[f"r{index}"].outputs[0]
        assert completion.token_ids == reference
        assert completion.text == source.tokenizer.decode(reference)
        assert completion.finish_reason == "length"


@pytest.fixture(scope="module")
def reference_greedy(source: ModelSource) -> dict[str, list[list[int]]]:
    return token_ids(
        run_all(make_engine(source, enable_prefix_caching=False), [(p, GREEDY) for p in PROMPTS])
    )


def test_chunked_prefill_gives_the_same_outputs(
    source: ModelSource, reference_greedy: dict[str, list[list[int]]]
) -> None:
    engine = make_engine(source, max_num_batched_tokens=5)
    assert token_ids(run_all(engine, [(p, GREEDY) for p in PROMPTS])) == reference_greedy


def test_preemption_under_tiny_kv_budget_gives_the_same_outputs(
    source: ModelSource, reference_greedy: dict[str, list[list[int]]]
) -> None:
    engine = make_engine(source, num_kv_blocks=16, block_size=4, max_model_len=64)
    assert token_ids(run_all(engine, [(p, GREEDY) for p in PROMPTS])) == reference_greedy
    assert engine.get_stats().num_preemptions > 0


def test_sequence_cap_gives_the_same_outputs(
    source: ModelSource, reference_greedy: dict[str, list[list[int]]]
) -> None:
    engine = make_engine(source, max_num_seqs=2)
    assert token_ids(run_all(engine, [(p, GREEDY) for p in PROMPTS])) == reference_greedy


def test_shared_system_prompt_is_computed_once(source: ModelSource) -> None:
    prompts = [SYSTEM + question for question in ("Hello?", "How are you today?", "Numbers: 1 2 3")]

    def run(prefix_caching: bool) -> tuple[dict[str, list[list[int]]], Any]:
        engine = make_engine(source, enable_prefix_caching=prefix_caching)
        engine.add_request("first", prompts[0], GREEDY)
        engine.step()  # the first request's prompt is computed (and cached) before the others arrive
        for index, prompt in enumerate(prompts[1:]):
            engine.add_request(f"later{index}", prompt, GREEDY)
        return token_ids(drain(engine)), engine.get_stats()

    cold_outputs, cold = run(prefix_caching=False)
    warm_outputs, warm = run(prefix_caching=True)
    assert warm_outputs == cold_outputs
    assert warm.prefix_cache_hit_rate > 0
    assert warm.num_prompt_tokens_computed < cold.num_prompt_tokens_computed


def test_n_and_best_of(source: ModelSource) -> None:
    engine = make_engine(source)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    out = run_all(engine, [(PROMPTS[0], params)])["r0"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert all(len(c.token_ids) == 12 for c in out.outputs)

    best = SamplingParams(n=2, best_of=5, temperature=1.0, seed=9, max_tokens=8, ignore_eos=True, logprobs=0)
    out = run_all(make_engine(source), [(PROMPTS[1], best)])["r0"]
    assert len(out.outputs) == 2
    scores = [c.cumulative_logprob for c in out.outputs]
    assert scores[0] is not None and scores[1] is not None and scores[0] >= scores[1]
    for completion in out.outputs:
        assert completion.logprobs is not None
        summed = sum(
            entry[t].logprob for entry, t in zip(completion.logprobs, completion.token_ids, strict=True)
        )
        assert summed == pytest.approx(completion.cumulative_logprob, abs=1e-4)
    # The 2 reported are the best 2 of the 5 candidates generated with the same seeds.
    all_five = SamplingParams(n=5, temperature=1.0, seed=9, max_tokens=8, ignore_eos=True, logprobs=0)
    everything = run_all(make_engine(source), [(PROMPTS[1], all_five)])["r0"].outputs
    top = sorted((c.cumulative_logprob or 0.0 for c in everything), reverse=True)[:2]
    assert scores == pytest.approx(top)


def test_seeded_request_is_reproducible_regardless_of_batch_mates(source: ModelSource) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = run_all(make_engine(source), [(PROMPTS[2], params)])["r0"].outputs[0].token_ids
    mates = [(p, SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)) for p in PROMPTS]
    mates.insert(3, (PROMPTS[2], params))
    crowded = run_all(make_engine(source, max_num_batched_tokens=7), mates)["r3"].outputs[0].token_ids
    assert crowded == alone


def test_prompt_too_long_and_output_capped_by_context(source: ModelSource) -> None:
    engine = make_engine(source, max_model_len=32, num_kv_blocks=16)
    with pytest.raises(PromptTooLongError):
        engine.add_request("long", prompt_token_ids=list(range(32)), params=GREEDY)
    assert not engine.has_unfinished_requests()
    engine.add_request(
        "fits", prompt_token_ids=list(range(20)), params=SamplingParams(temperature=0, max_tokens=100)
    )
    out = drain(engine)["fits"].outputs[0]
    assert len(out.token_ids) == 12
    assert out.finish_reason == "length"


def test_stop_string_is_never_streamed(source: ModelSource) -> None:
    free = run_all(make_engine(source), [(PROMPTS[1], GREEDY)])["r0"].outputs[0].text
    assert len(free) > 12
    stop = free[8:11]
    engine = make_engine(source)
    engine.add_request(
        "s", PROMPTS[1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    )
    streamed = ""
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            completion = output.outputs[0]
            streamed += completion.text_delta
            assert stop not in streamed
            assert completion.text == streamed
            final = completion
    assert final is not None and final.finish_reason == "stop" and final.stop_reason == stop
    expected = free[: free.index(stop)]
    assert final.text == expected == streamed


def test_streaming_token_deltas_add_up(source: ModelSource) -> None:
    engine = make_engine(source)
    engine.add_request("a", PROMPTS[0], GREEDY)
    tokens: list[int] = []
    text = ""
    last = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens += output.outputs[0].token_ids_delta
            text += output.outputs[0].text_delta
            last = output
    assert last is not None and last.finished
    assert tokens == last.outputs[0].token_ids
    assert text == last.outputs[0].text


def test_logprobs_and_prompt_logprobs_match_transformers(source: ModelSource, hf_model: Any) -> None:
    prompt = PROMPTS[1]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    for budget in (4096, 6):  # whole prompt at once, and in chunks
        out = run_all(make_engine(source, max_num_batched_tokens=budget), [(prompt, params)])["r0"]
        ids = out.prompt_token_ids + out.outputs[0].token_ids
        with torch.no_grad():
            reference = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
        assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
        assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
        for position in range(1, len(out.prompt_token_ids)):
            entry = out.prompt_logprobs[position]
            assert entry is not None
            token = out.prompt_token_ids[position]
            assert entry[token].logprob == pytest.approx(float(reference[position - 1, token]), abs=1e-3)
        completion = out.outputs[0]
        assert completion.logprobs is not None
        for step, (entry, token) in enumerate(zip(completion.logprobs, completion.token_ids, strict=True)):
            row = reference[len(out.prompt_token_ids) - 1 + step]
            assert entry[token].logprob == pytest.approx(float(row[token]), abs=1e-3)
            assert entry[token].rank == 1  # greedy
            assert len([e for e in entry.values() if e.rank is not None]) == 3


def test_beam_search_matches_a_full_recompute_reference(source: ModelSource, hf_model: Any) -> None:
    from servekit.llm.beam_search import beam_search

    params = SamplingParams(
        n=2, best_of=3, use_beam_search=True, temperature=0, max_tokens=6, ignore_eos=True
    )
    out = run_all(make_engine(source), [(PROMPTS[0], params)])["r0"]
    ids = source.tokenizer.encode(PROMPTS[0])

    def reference_step(sequences: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([hf_model(torch.tensor([s])).logits[0, -1].float() for s in sequences])

    expected = beam_search(reference_step, ids, params, source.tokenizer.eos_token_ids, 6)
    assert [c.token_ids for c in out.outputs] == [h.token_ids for h in expected]


def test_abort_1000_requests_at_random_points_returns_every_block(source: ModelSource) -> None:
    rng = random.Random(3)
    engine = make_engine(source, num_kv_blocks=48, block_size=4, max_model_len=64, max_num_batched_tokens=32)
    start_free = engine.block_manager.num_free_blocks
    live: list[str] = []
    added = 0
    while added < 1000 or engine.has_unfinished_requests():
        for _ in range(rng.randrange(0, 4)):
            if added < 1000:
                rid = f"r{added}"
                prompt_ids = [rng.randrange(1, 300) for _ in range(rng.randrange(1, 30))]
                params = SamplingParams(
                    n=rng.choice([1, 1, 2]), temperature=0.8, max_tokens=rng.randrange(1, 8)
                )
                engine.add_request(rid, prompt_token_ids=prompt_ids, params=params)
                live.append(rid)
                added += 1
        if live and rng.random() < 0.5:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        finished = {o.request_id for o in engine.step() if o.finished}
        live = [rid for rid in live if rid not in finished]
    assert engine.block_manager.num_free_blocks == start_free
    assert engine.scheduler.num_waiting == 0 and engine.scheduler.num_running == 0


def test_stats_split_forward_and_overhead(source: ModelSource) -> None:
    engine = make_engine(source)
    run_all(engine, [(p, GREEDY) for p in PROMPTS])
    stats = engine.get_stats()
    assert stats.num_steps >= 24
    assert 0 < stats.forward_time_s <= stats.step_time_s
    assert stats.num_generated_tokens == 24 * len(PROMPTS)
    assert stats.kv_cache_usage == 0.0


def test_engine_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "SERVEKIT_MAX_MODEL_LEN": "1024",
        "SERVEKIT_ENABLE_PREFIX_CACHING": "false",
        "SERVEKIT_KV_CACHE_MEMORY": "512MiB",
        "SERVEKIT_DTYPE": "bf16",
        "SERVEKIT_SEED": "none",
    }
    config = EngineConfig.from_env(env, max_num_seqs=8)
    assert config.max_model_len == 1024
    assert config.enable_prefix_caching is False
    assert config.kv_cache_memory == 512 << 20
    assert config.dtype == "bfloat16"
    assert config.seed is None
    assert config.max_num_seqs == 8
    with pytest.raises(ValueError):
        EngineConfig.from_env({"SERVEKIT_MAX_NUM_SEQS": "many"})
    with pytest.raises(ValueError):
        EngineConfig(dtype="int3")


def test_prompt_as_token_list_and_queue_limit(source: ModelSource) -> None:
    from servekit.llm import QueueFullError

    engine = make_engine(source, max_queued_requests=1)
    ids = source.tokenizer.encode(PROMPTS[0])
    engine.add_request("ids", ids, GREEDY)
    with pytest.raises(QueueFullError):
        engine.add_request("second", PROMPTS[1], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ids", PROMPTS[1], GREEDY)
    out = drain(engine)["ids"]
    assert out.prompt is None and out.prompt_token_ids == ids
    reference = run_all(make_engine(source), [(PROMPTS[0], GREEDY)])["r0"]
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
