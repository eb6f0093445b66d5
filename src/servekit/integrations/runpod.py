"""A RunPod serverless worker serving one model with servekit, configured like worker-vllm.

    python -m servekit.integrations.runpod                        # on RunPod
    python -m servekit.integrations.runpod --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port 8001

The model loads once per worker process, when it starts; a setting it cannot honour stops it there.
Jobs run on the in-process engine concurrently (``MAX_CONCURRENCY`` is the concurrency modifier).
Job inputs: ``prompt`` or ``messages`` with ``sampling_params``, ``stream`` and dynamic stream
batching; ``openai_route`` + ``openai_input``; ``route`` + ``body`` (+ ``method``). A job that fails
yields ``{"error": message}``, which fails the job on RunPod.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from servekit.integrations.local import LocalServer
from servekit.integrations.runpod_config import WorkerConfig
from servekit.integrations.runpod_jobs import Batching, NativeJob, OpenAIJob, batching, parse_job
from servekit.llm.errors import EngineInputError
from servekit.openai.errors import OpenAIError, openai_error
from servekit.openai.sse import DONE, sse_json
from servekit.settings import SettingError, setting_values

__all__ = ["Worker", "main"]

logger = logging.getLogger(__name__)


class Worker:
    """The model, loaded once, and the job handler ``runpod.serverless.start`` calls."""

    def __init__(self, config: WorkerConfig | None = None) -> None:
        self.config = config if config is not None else WorkerConfig.from_env()
        self.config.prepare_environment()
        self.server = LocalServer(self.config.serve)

    def concurrency_modifier(self, current_concurrency: int) -> int:
        return self.config.worker.max_concurrency

    def runpod_config(self) -> dict[str, Any]:
        return {
            "handler": self.handler,
            "concurrency_modifier": self.concurrency_modifier,
            "return_aggregate_stream": True,
        }

    def shutdown(self) -> None:
        self.server.shutdown()

    async def handler(self, job: dict[str, Any]) -> AsyncIterator[Any]:
        """One job: yields its outputs (one, or one per streamed batch); an error as ``{"error": ...}``."""
        job_input = job.get("input") or {}
        # Errors of OpenAI routes are OpenAI error bodies, the others messages.
        openai_route = isinstance(job_input, dict) and ("openai_route" in job_input or "route" in job_input)
        try:
            parsed = parse_job(job_input)
            settings = self.config.worker
            sizes = batching(
                job_input,
                settings.default_batch_size,
                settings.default_min_batch_size,
                settings.default_batch_size_growth_factor,
            )
            if isinstance(parsed, OpenAIJob):
                async for item in self._openai(parsed, sizes):
                    yield item
            else:
                async for item in self._native(parsed, sizes, str(job.get("id") or uuid.uuid4().hex)):
                    yield item
        except Exception as error:
            mapped = openai_error(error)
            if mapped is None:
                logger.exception("job %s failed", job.get("id"))
                mapped = OpenAIError(500, f"Internal error: {type(error).__name__}: {error}")
            yield {"error": mapped.body()["error"] if openai_route else mapped.message}
        finally:
            if not self.config.worker.disable_log_stats:
                logger.info("engine stats: %s", self.server.runtime.engine.get_stats())

    # --------------------------------------------------------------------------------- OpenAI
    async def _openai(self, job: OpenAIJob, sizes: Batching) -> AsyncIterator[Any]:
        server = self.server
        if job.kind == "models":
            yield await server.models()
            return
        request = server.parse(job.kind, job.body)
        server.check_model(request.model)
        role = self.config.worker.openai_response_role
        if not request.stream:
            async for item in server.run(job.kind, request):
                yield with_role(item, role)
            return
        raw = self.config.worker.raw_openai_output
        pending: list[dict[str, Any]] = []
        size_of = sizes.sizes()
        size = next(size_of)
        async for chunk in server.run(job.kind, request):
            pending.append(with_role(chunk, role))
            if len(pending) >= size:
                yield _openai_batch(pending, raw)
                pending, size = [], next(size_of)
        if raw:
            yield _openai_batch(pending, raw) + DONE.decode()
        elif pending:
            yield pending

    # --------------------------------------------------------------------------------- native
    async def _native(self, job: NativeJob, sizes: Batching, job_id: str) -> AsyncIterator[dict[str, Any]]:
        rt = self.server.runtime
        try:
            if job.messages is not None:
                prepared = rt.inputs.prepare_chat(job.messages, job.params)
            else:
                prepared = rt.inputs.prepare(job.prompt, job.params)
        except EngineInputError as error:
            raise openai_error(error, _native_param) or error from None
        request_id = f"runpod-{job_id}-{uuid.uuid4().hex[:8]}"
        first, stream = await rt.requests.start(request_id, prepared)
        try:
            size_of: Iterator[int] = sizes.sizes() if job.stream else iter(lambda: 2**62, None)
            size = next(size_of)
            n = len(first.outputs)
            tokens: list[list[str]] = [[] for _ in range(n)]
            pending = 0
            output_tokens = 0
            output: Any = first
            while output is not None:
                step_tokens = 0
                for completion in output.outputs:
                    if completion.index < n and (completion.token_ids_delta or completion.text_delta):
                        tokens[completion.index].append(completion.text_delta)
                        step_tokens = max(step_tokens, len(completion.token_ids_delta))
                        output_tokens += len(completion.token_ids_delta)
                pending += step_tokens
                usage = {"input": len(output.prompt_token_ids), "output": output_tokens}
                if output.finished or pending >= size:
                    yield {"choices": [{"tokens": t} for t in tokens], "usage": usage}
                    tokens, pending, size = [[] for _ in range(n)], 0, next(size_of)
                if output.finished:
                    break
                output = await anext(stream, None)
        finally:
            rt.requests.done(request_id)
            await stream.aclose()


def _native_param(engine_param: str) -> str:
    if engine_param == "prompt":
        return "prompt"
    if engine_param.startswith("messages"):
        return engine_param
    return f"sampling_params.{engine_param}"


def _openai_batch(chunks: list[dict[str, Any]], raw: bool) -> Any:
    if raw:
        return b"".join(sse_json(chunk) for chunk in chunks).decode()
    return chunks


def with_role(item: dict[str, Any], role: str) -> dict[str, Any]:
    """A chat body or chunk with ``role`` for its messages (``OPENAI_RESPONSE_ROLE``)."""
    if role == "assistant":
        return item
    for choice in item.get("choices") or []:
        for key in ("message", "delta"):
            part = choice.get(key)
            if isinstance(part, dict) and "role" in part:
                part["role"] = role
    return item


def main() -> None:
    import runpod

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = WorkerConfig.from_env()
        worker = Worker(config)  # loads the model
    except SettingError as error:
        sys.exit(f"servekit runpod worker: error: {error}")
    logger.info("serving %s with %s", worker.server.model_name, setting_values(config.worker))
    runpod.serverless.start(worker.runpod_config())


if __name__ == "__main__":
    main()
