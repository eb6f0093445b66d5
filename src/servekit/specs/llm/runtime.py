"""The worker side of ``servekit serve``: the engine and what the route handlers share around it."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable

from servekit.llm.async_engine import AsyncEngine
from servekit.llm.outputs import RequestOutput
from servekit.specs.llm.config import ServeConfig
from servekit.specs.llm.faults import install_fault_hooks
from servekit.specs.llm.metrics import Counters
from servekit.specs.llm.requests import RunningRequests, drain

logger = logging.getLogger(__name__)


class Runtime:
    """The engine (with its tokenizer and input step), the requests it runs, and their counters."""

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
        self.requests = RunningRequests(self.engine)
        self.counters = Counters()
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
        install_fault_hooks(llm_engine)
        from servekit.llm.tp_runner import TensorParallelRunner

        if isinstance(runner, TensorParallelRunner):  # a rank process that dies fails this worker
            runner.on_failure = on_engine_failure
        # This worker process serves the engine from now on: what loading left alive (modules, the
        # model and tokenizer, ~700k objects for the default model) stays out of the cyclic
        # collector's full passes, which otherwise traverse it all while steps run (3-4% of a
        # 32-sequence decode step of the default model).
        gc.collect()
        gc.freeze()

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    async def final_output(
        self, request_id: str, first: RequestOutput, stream: AsyncIterator[RequestOutput]
    ) -> RequestOutput:
        """Drain a request's stream to its last output and count it. An abort by id ends it early;
        a client that went away propagates the cancellation (and is counted as cancelled)."""
        try:
            last = await drain(first, stream)
        except asyncio.CancelledError:
            if not self.requests.was_aborted(request_id):
                self.counters.record_cancel()
                raise
            last = first
        self.counters.record(last)
        return last
