"""The worker-side state the LLM server's handlers share: engine, its input step, counters."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from servekit.llm.async_engine import AsyncEngine
from servekit.llm.inputs import EngineInput
from servekit.llm.outputs import RequestOutput
from servekit.specs.llm.config import ServeConfig

logger = logging.getLogger(__name__)

# Test hooks: the engine's step raises after this many steps (a dead engine must restart the worker),
# or each step takes this much longer (keeps requests running long enough to observe queueing).
FAIL_AFTER_STEPS_ENV = "SERVEKIT_TEST_ENGINE_FAIL_AFTER_STEPS"
STEP_DELAY_ENV = "SERVEKIT_TEST_ENGINE_STEP_DELAY_S"


@dataclass
class Counters:
    """Server-side counters for /metrics (the engine's own come from ``get_stats``)."""

    requests: dict[str, int] = field(default_factory=dict)  # by route kind
    errors: dict[str, int] = field(default_factory=dict)  # by status code
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    ttft_sum: float = 0.0
    ttft_count: int = 0
    e2e_sum: float = 0.0


class Runtime:
    def __init__(self, config: ServeConfig, on_engine_failure: Callable[[str], None]) -> None:
        """``on_engine_failure`` is told (on the engine's thread) if the engine loop dies."""
        self.config = config
        self.engine = AsyncEngine(
            config.engine, on_failure=lambda error: on_engine_failure(f"the engine loop failed: {error!r}")
        )
        llm_engine = self.engine.engine
        self.tokenizer = llm_engine.tokenizer
        self.model_name: str = llm_engine.model_name
        self.max_model_len: int = llm_engine.max_model_len
        self.vocab_size: int = llm_engine.model_config.vocab_size
        self.inputs = llm_engine.inputs
        self.counters = Counters()
        self.running: dict[str, asyncio.Task[Any]] = {}  # engine request id -> the task streaming it
        self.aborted: set[str] = set()
        self.started = time.time()
        runner = llm_engine.runner
        self.kv_tokens = runner.num_blocks * runner.block_size
        logger.info(
            "model %s loaded: context %d tokens, KV cache %d blocks of %d tokens (%d tokens)",
            self.model_name,
            self.max_model_len,
            runner.num_blocks,
            runner.block_size,
            self.kv_tokens,
        )
        self._install_test_hooks()

    # ----------------------------------------------------------------------- engine lifecycle
    def _install_test_hooks(self) -> None:
        fail_after = os.environ.get(FAIL_AFTER_STEPS_ENV)
        delay = float(os.environ.get(STEP_DELAY_ENV) or 0)
        if not fail_after and not delay:
            return
        limit = int(fail_after) if fail_after else None
        llm_engine = self.engine.engine
        step = llm_engine.step
        count = [0]

        def test_step(final_only: bool = False) -> list[RequestOutput]:
            count[0] += 1
            if limit is not None and count[0] > limit:
                raise RuntimeError(f"{FAIL_AFTER_STEPS_ENV}: simulated engine failure")
            if delay:
                time.sleep(delay)
            return step(final_only)

        llm_engine.step = test_step  # type: ignore[method-assign]

    # ------------------------------------------------------------------------------- prompts
    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ----------------------------------------------------------------------------- generation
    async def start(
        self, request_id: str, prepared: EngineInput
    ) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
        """Submit a request and wait for its first output, so that engine errors are raised here,
        before the caller has streamed anything."""
        stream: AsyncGenerator[RequestOutput, None] = self.engine.generate(  # type: ignore[assignment]
            prepared, request_id=request_id
        )
        task = asyncio.current_task()
        if task is not None:
            self.running[request_id] = task
        try:
            first = await anext(stream)
        except BaseException:
            self.running.pop(request_id, None)
            await stream.aclose()
            raise
        return first, stream

    def done(self, request_id: str) -> None:
        self.running.pop(request_id, None)
        self.aborted.discard(request_id)

    def abort(self, request_id: str) -> bool:
        """Abort a running request by id: its stream ends with finish_reason "abort"."""
        task = self.running.get(request_id)
        if task is None:
            return False
        self.aborted.add(request_id)
        task.cancel()
        return True

    def was_aborted(self, request_id: str) -> bool:
        """Called on CancelledError: True (and the cancellation is absorbed) for an abort by id."""
        if request_id not in self.aborted:
            return False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True

    def record(self, output: RequestOutput) -> None:
        counters = self.counters
        counters.prompt_tokens += len(output.prompt_token_ids)
        counters.generation_tokens += sum(len(c.token_ids) for c in output.outputs)
        for completion in output.outputs:
            reason = completion.finish_reason or "abort"
            counters.finished[reason] = counters.finished.get(reason, 0) + 1
        metrics = output.metrics
        if metrics is not None and metrics.time_to_first_token is not None:
            counters.ttft_sum += metrics.time_to_first_token
            counters.ttft_count += 1
            if metrics.finished_time is not None:
                counters.e2e_sum += metrics.finished_time - metrics.arrival_time

    async def final_output(
        self, request_id: str, first: RequestOutput, stream: AsyncIterator[RequestOutput]
    ) -> RequestOutput:
        """Drain a request's stream to its last output and count it. An abort by id ends it early;
        a client that went away propagates the cancellation (and is counted as cancelled)."""
        try:
            last = await drain(first, stream)
        except asyncio.CancelledError:
            if not self.was_aborted(request_id):
                self.record_cancel()
                raise
            last = first
        self.record(last)
        return last

    def record_cancel(self) -> None:
        """A request whose client went away (its engine sequence is aborted as the stream closes)."""
        self.counters.finished["cancelled"] = self.counters.finished.get("cancelled", 0) + 1

    def count_request(self, kind: str) -> None:
        self.counters.requests[kind] = self.counters.requests.get(kind, 0) + 1

    def count_error(self, status: int) -> None:
        key = str(status)
        self.counters.errors[key] = self.counters.errors.get(key, 0) + 1


async def drain(first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The last output of a request's stream, starting from its first."""
    last = first
    while not last.finished:
        following = await anext(stream, None)
        if following is None:
            break
        last = following
    return last


async def interleave(
    pairs: Sequence[tuple[RequestOutput, AsyncIterator[RequestOutput]]],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """The outputs of several requests as they come, each tagged with its request's position."""
    queue: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

    async def pump(position: int, first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> None:
        await queue.put((position, first))
        if not first.finished:
            async for output in stream:
                await queue.put((position, output))
        await queue.put((position, None))

    pumps = [asyncio.ensure_future(pump(i, first, stream)) for i, (first, stream) in enumerate(pairs)]
    remaining = len(pumps)
    try:
        while remaining:
            position, output = await queue.get()
            if output is None:
                remaining -= 1
                continue
            yield position, output
    finally:
        for task in pumps:
            task.cancel()
        # Let the pumps leave their engine streams before those are closed.
        await asyncio.gather(*pumps, return_exceptions=True)
