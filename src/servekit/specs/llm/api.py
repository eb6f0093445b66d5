"""LLMServerAPI: the worker side of ``servekit serve``. It holds the ``AsyncEngine``; its async
``predict`` runs every request as a task of the core's continuous worker loop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from servekit.api import LitAPI
from servekit.errors import internal_error_detail
from servekit.openai.errors import OpenAIError, invalid, openai_error
from servekit.specs.llm.config import ServeConfig
from servekit.specs.llm.ops import Op
from servekit.specs.llm.schemas import chat_roles
from servekit.specs.llm.spec import LLMServerSpec

logger = logging.getLogger(__name__)


class LLMServerAPI(LitAPI):
    def __init__(
        self,
        config: ServeConfig | None = None,
        spec: LLMServerSpec | None = None,
        *,
        engine_on_slot_device: bool = False,
    ) -> None:
        """``engine_on_slot_device``: run the engine on the device the serving core gives ``setup``
        (one GPU per worker) instead of the configured one."""
        self.config = config if config is not None else ServeConfig()
        self.engine_on_slot_device = engine_on_slot_device
        super().__init__(spec=spec if spec is not None else LLMServerSpec(self.config))
        self.runtime: Any = None
        self._handlers: dict[str, Any] = {}

    def setup(self, device: str) -> None:
        from servekit.specs.llm.chat import ChatHandler
        from servekit.specs.llm.completions import CompletionHandler
        from servekit.specs.llm.native import GenerateHandler
        from servekit.specs.llm.runtime import Runtime

        config = self.config
        if self.engine_on_slot_device:
            config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, device=device))
        # A dead engine (or tensor-parallel rank) fails this worker through the supervisor, which
        # restarts it.
        self.runtime = Runtime(config, on_engine_failure=self.report_unhealthy)
        self._handlers = {
            "chat": ChatHandler(self.runtime).run,
            "completion": CompletionHandler(self.runtime).run,
            "generate": GenerateHandler(self.runtime).run,
        }

    async def predict(self, x: Op, **kwargs: Any) -> AsyncIterator[Any]:
        op = x
        handler = self._handlers.get(op.kind)
        if handler is None:  # an operation on this worker (abort, stats, ...), not a request
            try:
                result = self._operation(op)
            except Exception as error:
                raise self._client_error(error, op) from None
            yield result
            return
        rt = self.runtime
        rt.counters.count_request(op.kind)
        started = time.perf_counter()
        if self.config.log_prompts:
            logger.info("%s request prompt: %s", op.kind, prompt_text(op.body))
        try:
            async for item in handler(op.body):
                yield item
        except asyncio.CancelledError:
            raise
        except Exception as error:
            mapped = self._client_error(error, op)
            rt.counters.count_error(mapped.status_code)
            raise mapped from None
        finally:
            if not self.config.disable_log_requests:
                logger.info("%s request done in %.3fs", op.kind, time.perf_counter() - started)

    def _client_error(self, error: Exception, op: Op) -> OpenAIError:
        """The one mapping of what the engine (or a handler) raised to the client's error."""
        mapped = openai_error(error, getattr(op.body, "param_name", None))
        if mapped is None:
            logger.exception("%s request failed", op.kind)
            mapped = OpenAIError(500, internal_error_detail(error, self._debug_errors))
        return mapped

    def _operation(self, op: Op) -> Any:
        from servekit.specs.llm import native

        rt = self.runtime
        if op.kind == "tokenize":
            return native.tokenize(rt, op.body)
        if op.kind == "detokenize":
            return native.detokenize(rt, op.body)
        if op.kind == "encode":
            return native.encode(rt, op.body)
        if op.kind == "abort":
            return {"aborted": rt.requests.abort(str(op.body))}
        if op.kind == "flush_cache":
            return self._flush_cache()
        if op.kind == "stats":
            return self._stats()
        if op.kind == "model_info":
            return self._model_info()
        raise invalid(f"unknown operation {op.kind!r}", None)

    def _flush_cache(self) -> dict[str, Any]:
        engine = self.runtime.engine.engine
        # The engine belongs to its loop thread; flushing while requests run would race with it.
        if engine.has_unfinished_requests():
            raise invalid("cannot flush the cache while requests are running", None)
        engine.reset_prefix_cache()
        stats = engine.get_stats()
        return {"flushed": True, "num_free_kv_blocks": stats.num_free_kv_blocks}

    def _stats(self) -> dict[str, Any]:
        rt = self.runtime
        stats = rt.engine.get_stats()
        return {
            "engine": dataclasses.asdict(stats),
            "counters": dataclasses.asdict(rt.counters),
            "kv_cache_tokens": rt.kv_tokens,
            "uptime_s": time.time() - rt.started,
        }

    def _model_info(self) -> dict[str, Any]:
        rt = self.runtime
        llm_engine = rt.engine.engine
        model_config = llm_engine.model_config
        return {
            "model_name": rt.model_name,
            "model_path": getattr(llm_engine.source, "path", ""),
            "max_model_len": rt.max_model_len,
            "vocab_size": rt.vocab_size,
            "architecture": getattr(model_config, "architectures", None),
            "dtype": str(llm_engine.dtype).removeprefix("torch."),
            "quantization": llm_engine.quantization,
            "checkpoint_quantization": llm_engine.source.quantization,
            # how the checkpoint's quantised weights are computed: "blocks" or "dequantize" (None: none)
            "gguf_weights": (
                None
                if llm_engine.source.quantization is None
                else "blocks"
                if getattr(llm_engine, "gguf_blocks", False)
                else "dequantize"
            ),
            "kv_cache_dtype": str(llm_engine.kv_cache_dtype).removeprefix("torch."),
            "kv_cache_tokens": rt.kv_tokens,
            "has_chat_template": rt.inputs.chat_template_source is not None,
            "chat_roles": chat_roles(rt.inputs),
            "is_generation": True,
            "created": int(rt.started),
        }


def prompt_text(body: Any) -> str:
    """What a request asks, for ``--log-prompts``: its messages or its prompt."""
    messages = getattr(body, "messages", None)
    if messages is not None:
        return " | ".join(f"{getattr(m, 'role', '?')}: {getattr(m, 'content', m)!s}" for m in messages)
    return str(getattr(body, "prompt", ""))
