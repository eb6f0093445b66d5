"""AsyncEngine: streaming from a background step loop, abort on cancel/close, shutdown."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import torch

from servekit.llm import (
    AsyncEngine,
    EngineClosedError,
    EngineConfig,
    LLMEngine,
    PromptTooLongError,
    RequestOutput,
    SamplingParams,
)
from servekit.llm.loaders import ModelSource, load_model_source
from tests.llm.tiny_models import build_tiny_checkpoint

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(60)

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return load_model_source(str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")))


@pytest.fixture
def engine(source: ModelSource) -> Iterator[AsyncEngine]:
    config = EngineConfig(max_model_len=256, block_size=8, num_kv_blocks=128)
    async_engine = AsyncEngine(engine=LLMEngine(config, source=source))
    yield async_engine
    async_engine.shutdown()


async def collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [output async for output in stream]


async def wait_for_idle_engine(engine: AsyncEngine) -> None:
    """Abort is processed by the loop thread: wait (bounded, by yielding) until it has freed everything."""
    bm = engine.engine.block_manager
    for _ in range(2000):
        if not engine.engine.has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the engine did not release the request")


def hold_loop_after(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, steps: int, until: Callable[[], bool]
) -> None:
    """Let the loop thread run ``steps`` steps, then hold each further step until ``until()``.

    A tiny model can otherwise finish a request before the test has acted on it (CI saw this).
    """
    real_step = engine.engine.step
    taken = 0

    def held_step() -> list[RequestOutput]:
        nonlocal taken
        taken += 1
        for _ in range(6000):  # bounded: 30 s
            if taken <= steps or until():
                break
            time.sleep(0.005)
        return real_step()

    monkeypatch.setattr(engine.engine, "step", held_step)


def test_streams_match_offline_outputs(engine: AsyncEngine, source: ModelSource) -> None:
    prompts = ["Hello, world!", "The quick brown fox", "Numbers: 0 1 2 3"]
    offline = LLMEngine(EngineConfig(max_model_len=256, block_size=8, num_kv_blocks=128), source=source)
    for index, prompt in enumerate(prompts):
        offline.add_request(str(index), prompt, GREEDY)
    expected: dict[str, Any] = {}
    while offline.has_unfinished_requests():
        for output in offline.step(final_only=True):
            expected[output.request_id] = output.outputs[0]

    async def main() -> list[list[RequestOutput]]:
        streams = [engine.generate(p, GREEDY, request_id=str(i)) for i, p in enumerate(prompts)]
        return await asyncio.gather(*(collect(s) for s in streams))

    results = asyncio.run(main())
    for index, outputs in enumerate(results):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert len(outputs) == 20  # one output per generated token
        final = outputs[-1].outputs[0]
        assert final.token_ids == expected[str(index)].token_ids
        assert "".join(o.outputs[0].text_delta for o in outputs) == final.text == expected[str(index)].text
        assert [t for o in outputs for t in o.outputs[0].token_ids_delta] == final.token_ids


def test_closing_the_stream_aborts_the_request(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    hold_loop_after(engine, monkeypatch, 3, release.is_set)

    async def main() -> None:
        stream = engine.generate("Hello, world!", LONG, request_id="closed")
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        await stream.aclose()
        release.set()
        await wait_for_idle_engine(engine)

    asyncio.run(main())
    assert engine.get_stats().num_generated_tokens < 200


def test_cancelling_the_consumer_task_aborts_the_request(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    hold_loop_after(engine, monkeypatch, 1, release.is_set)

    async def main() -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate("The quick brown fox", LONG, request_id="cancelled"):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await wait_for_idle_engine(engine)

    asyncio.run(main())
    assert engine.get_stats().num_generated_tokens < 200


def test_explicit_abort_ends_nothing_else(engine: AsyncEngine) -> None:
    async def main() -> list[RequestOutput]:
        victim = engine.generate("Hello, world!", LONG, request_id="victim")
        await victim.__anext__()
        survivor = asyncio.create_task(
            collect(engine.generate("Numbers: 1 2", GREEDY, request_id="survivor"))
        )
        await engine.abort("victim")
        outputs = await survivor
        await victim.aclose()
        await wait_for_idle_engine(engine)
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 20


def test_invalid_requests_fail_before_anything_is_queued(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    async def main() -> None:
        with pytest.raises(PromptTooLongError):
            await engine.generate(prompt_token_ids=list(range(300)), sampling_params=GREEDY).__anext__()
        with pytest.raises(ValueError):
            await engine.generate(prompt_token_ids=[10**6], sampling_params=GREEDY).__anext__()
        hold_loop_after(engine, monkeypatch, 1, release.is_set)  # "dup" stays unfinished
        first = engine.generate("Hello", GREEDY, request_id="dup")
        try:
            await first.__anext__()
            with pytest.raises(ValueError, match="already in use"):
                await engine.generate("Hello", GREEDY, request_id="dup").__anext__()
        finally:
            release.set()
        await first.aclose()

        await wait_for_idle_engine(engine)

    asyncio.run(main())


def test_shutdown_ends_open_streams(source: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    config = EngineConfig(max_model_len=256, block_size=8, num_kv_blocks=128)
    async_engine = AsyncEngine(engine=LLMEngine(config, source=source))
    hold_loop_after(async_engine, monkeypatch, 1, lambda: not async_engine.is_running)

    async def main() -> None:
        stream = async_engine.generate("Hello", LONG)
        await stream.__anext__()
        await asyncio.to_thread(async_engine.shutdown)
        with pytest.raises(EngineClosedError):
            async for _ in stream:
                pass
        with pytest.raises(EngineClosedError):
            await async_engine.generate("Hello", GREEDY).__anext__()

    asyncio.run(main())
    assert not async_engine.is_running


def test_idle_loop_thread_waits_instead_of_stepping(engine: AsyncEngine) -> None:
    async def main() -> None:
        await collect(engine.generate("Hello", GREEDY))
        await wait_for_idle_engine(engine)

    asyncio.run(main())
    # An idle loop thread parks in Condition.wait (a busy loop would never be found there).
    thread_id = engine._thread.ident
    assert thread_id is not None
    for _ in range(1000):
        frame = sys._current_frames().get(thread_id)
        if frame is not None and frame.f_code.co_name == "wait" and "threading" in frame.f_code.co_filename:
            break
        engine._thread.join(timeout=0.001)
    else:
        raise AssertionError("the idle loop thread is not waiting on its condition")
    assert engine.is_running


def test_the_loop_thread_builds_the_engine_and_reports_a_failed_build(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import servekit.llm.engine as engine_module

    built_on: list[str] = []
    original_init = engine_module.LLMEngine.__init__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        built_on.append(threading.current_thread().name)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.LLMEngine, "__init__", recording_init)
    checkpoint = build_tiny_checkpoint(tmp_path / "m")
    async_engine = AsyncEngine(EngineConfig(model=str(checkpoint), max_model_len=64, num_kv_blocks=16))
    try:
        # Loading and stepping share one thread, so PyTorch keeps one OpenMP pool (see the module doc).
        assert built_on == ["servekit-engine"]
        assert async_engine.engine.model_config.vocab_size > 0
    finally:
        async_engine.shutdown()

    before = threading.active_count()
    with pytest.raises(Exception, match="no-such-model"):
        AsyncEngine(EngineConfig(model=str(tmp_path / "no-such-model")))
    assert threading.active_count() == before  # the failed loop thread is gone
