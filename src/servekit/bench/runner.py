"""Sending the benchmark's requests: streamed, at a fixed concurrency or a Poisson request rate,
timing every streamed chunk; token counts come from the server's ``usage``."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from servekit.bench.datasets import BenchPrompt

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"


@dataclass
class RequestResult:
    ok: bool = False
    start: float = 0.0  # seconds since the run started
    ttft: float = 0.0
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)  # between consecutive content chunks
    chunk_times: list[float] = field(default_factory=list)  # since the run started
    error: str = ""


@dataclass(frozen=True)
class LoadSettings:
    base_url: str
    endpoint: str
    model: str
    max_concurrency: int | None
    request_rate: float  # requests per second; inf: all at once (bounded by max_concurrency)
    burstiness: float
    ignore_eos: bool
    temperature: float
    seed: int
    timeout: float
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)  # more request fields, sent as they are


def request_body(settings: LoadSettings, prompt: BenchPrompt, index: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": settings.model,
        "max_tokens": prompt.output_len,
        "temperature": settings.temperature,
        "seed": settings.seed + index,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if settings.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extra field, which servekit serve accepts too
    body.update(settings.extra_body)
    if settings.endpoint == CHAT_ENDPOINT:
        body["messages"] = [{"role": "user", "content": prompt.prompt}]
    else:
        body["prompt"] = prompt.prompt
    return body


def _content(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return str(delta.get("content") or delta.get("reasoning_content") or "")
    return str(choice.get("text") or "")


async def one_request(
    session: Any, settings: LoadSettings, prompt: BenchPrompt, index: int, run_start: float
) -> RequestResult:
    import aiohttp

    result = RequestResult(start=time.perf_counter() - run_start)
    started = time.perf_counter()
    last = started
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    url = settings.base_url.rstrip("/") + settings.endpoint
    try:
        response = await _post(session, url, request_body(settings, prompt, index), headers)
        async with response:
            if response.status != 200:
                result.error = (
                    f"HTTP {response.status}: {(await response.read())[:300].decode(errors='replace')}"
                )
                return result
            async for raw in response.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error']}"
                    return result
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                if not _content(chunk):
                    continue
                now = time.perf_counter()
                if not result.chunk_times:
                    result.ttft = now - started
                else:
                    result.itls.append(now - last)
                result.chunk_times.append(now - run_start)
                last = now
        result.latency = time.perf_counter() - started
        if result.output_tokens == 0:
            result.error = "the server sent no usage (stream_options.include_usage) or no tokens"
            return result
        result.ok = True
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


async def _post(session: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    """POST once more on a fresh connection when a pooled keep-alive one turns out closed.

    Servers cap the requests per connection (llama-server's HTTP library closes after a few), and
    a connection closed between two requests fails the next one before any byte comes back: as a
    disconnect, or as an error writing the request when the close lands during the write. A failed
    connection leaves the pool, but the next one taken may be closed too: one more attempt per
    connection the pool can hold, so the last ones go out on a fresh connection.
    """
    import aiohttp

    attempts = max(1, getattr(session.connector, "limit", 0) or 1) + 1
    for _ in range(attempts - 1):
        try:
            return await session.post(url, json=body, headers=headers)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            continue
    return await session.post(url, json=body, headers=headers)


def arrival_gaps(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: a Poisson process (gamma with ``burstiness`` = 1)."""
    if rate == float("inf"):
        return [0.0] * count
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(count)]


async def run_load(
    settings: LoadSettings,
    prompts: list[BenchPrompt],
    num_warmups: int,
    on_done: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], list[RequestResult], float]:
    """(warm-up results, measured results, duration of the measured run in seconds)."""
    import aiohttp

    limit = settings.max_concurrency or 0
    connector = aiohttp.TCPConnector(limit=limit)
    timeout = aiohttp.ClientTimeout(total=settings.timeout)
    semaphore = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency else None
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warmups = []
        for index in range(num_warmups):
            warm = BenchPrompt(prompts[index % len(prompts)].prompt, min(8, prompts[0].output_len))
            warmups.append(await one_request(session, settings, warm, -1 - index, time.perf_counter()))
        run_start = time.perf_counter()

        async def send(index: int, prompt: BenchPrompt) -> RequestResult:
            if semaphore is None:
                result = await one_request(session, settings, prompt, index, run_start)
            else:
                async with semaphore:
                    result = await one_request(session, settings, prompt, index, run_start)
            if on_done is not None:
                on_done(result)
            return result

        tasks = []
        for index, (prompt, gap) in enumerate(
            zip(
                prompts,
                arrival_gaps(len(prompts), settings.request_rate, settings.burstiness, settings.seed),
                strict=True,
            )
        ):
            if gap:
                await asyncio.sleep(gap)  # the load's arrival process, not synchronisation
            tasks.append(asyncio.ensure_future(send(index, prompt)))
        results = list(await asyncio.gather(*tasks))
        return warmups, results, time.perf_counter() - run_start


async def first_model(base_url: str, api_key: str | None, timeout: float) -> str:
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(base_url.rstrip("/") + "/v1/models", headers=headers) as response,
    ):
        if response.status != 200:
            raise RuntimeError(f"GET /v1/models answered {response.status}: pass --model")
        models = (await response.json()).get("data") or []
        if not models:
            raise RuntimeError("the server lists no models: pass --model")
        return str(models[0]["id"])
