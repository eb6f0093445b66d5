"""Operations on `servekit serve` (tiny random model): the LLM metrics while a load runs, request ids
and prompt-free logs, the Grafana dashboard's metric names, the browser's root."""

from __future__ import annotations

import concurrent.futures
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.serving import REPO, RunningServer, serve_script, tiny_checkpoint
from tests.e2e.test_core_ops import scrape, value, wait_until

pytestmark = pytest.mark.timeout(240)

# Each engine step takes at least this long, so a stream runs long enough to be seen running.
SERVER_ENV = {
    "SERVEKIT_NUM_THREADS": "1",
    "SERVEKIT_MAX_MODEL_LEN": "512",
    "SERVEKIT_LOG_LEVEL": "info",
    "SERVEKIT_TEST_ENGINE_STEP_DELAY_S": "0.02",
}
SECRET = "zebra-umbrella-7731"  # prompt text that must not reach the logs
LOAD = 6
DASHBOARD = REPO / "deploy" / "grafana" / "servekit-dashboard.json"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serve_script("llm_serve.py", tmp_path_factory.mktemp("server"), SERVER_ENV, [str(tiny_model)]) as s:
        yield s


def stream_chat(url: str, content: str, max_tokens: int) -> openai.types.CompletionUsage:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    return usage


def test_llm_metrics_move_under_load(server: RunningServer) -> None:
    before = scrape(server.url)
    with concurrent.futures.ThreadPoolExecutor(LOAD) as pool:
        futures = [pool.submit(stream_chat, server.url, f"{SECRET} number {i}", 24) for i in range(LOAD)]
        seen: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []

        def running() -> bool:
            seen.append(scrape(server.url))
            return value(seen[-1], "servekit:num_requests_running", worker="0") >= 1

        wait_until(running)
        # The same scrape (one get_stats of the worker): running sequences hold KV blocks.
        assert value(seen[-1], "servekit:kv_cache_usage_perc", worker="0") > 0
        usages = [f.result() for f in futures]
    after = scrape(server.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert all(u.completion_tokens == 24 for u in usages)  # ignore_eos: the full length
    assert moved("servekit:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert moved("servekit:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    for histogram in (
        "servekit:time_to_first_token_seconds",
        "servekit:e2e_request_latency_seconds",
        "servekit:request_queue_time_seconds",
    ):
        assert moved(f"{histogram}_count") == LOAD, histogram
        assert moved(f"{histogram}_sum") > 0, histogram
    # One interval between each pair of consecutive tokens of each request.
    assert moved("servekit:inter_token_latency_seconds_count") == LOAD * 23
    assert moved("servekit:request_success_total", finished_reason="length") == LOAD
    assert moved("servekit:prefix_cache_queries_total") >= sum(u.prompt_tokens for u in usages)
    assert moved("servekit_http_requests_total", route="/v1/chat/completions", status="200") == LOAD
    assert value(after, "servekit:num_requests_running", worker="0") == 0
    assert value(after, "servekit:num_requests_waiting", worker="0") == 0


def test_aborted_stream_is_counted(server: RunningServer) -> None:
    before = value(scrape(server.url), "servekit:num_aborted_requests_total")
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # the first chunk: then go away
    wait_until(lambda: value(scrape(server.url), "servekit:num_aborted_requests_total") == before + 1)
    wait_until(lambda: value(scrape(server.url), "servekit:num_requests_running", worker="0") == 0)


def test_request_id_and_prompt_free_logs(server: RunningServer) -> None:
    given = f"serve-{id(server)}-rid"
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": f"{SECRET} tagged"}],
        max_tokens=4,
        extra_headers={"X-Request-ID": given},
    )
    assert raw.headers["x-request-id"] == given
    models = httpx.get(f"{server.url}/v1/models")
    assert re.fullmatch(r"[0-9a-f]{32}", models.headers["x-request-id"])
    wait_until(lambda: sum(given in line for line in server.log().splitlines()) >= 2)
    tagged = [line for line in server.log().splitlines() if given in line]
    assert any("chat request done" in line for line in tagged)  # the worker's line
    assert any('"POST /v1/chat/completions" 200' in line for line in tagged)  # the access log
    assert SECRET not in server.log()


def test_log_prompts_flag(tiny_model: Path, tmp_path: Path) -> None:
    env = {**SERVER_ENV, "SERVEKIT_LOG_FORMAT": "json", "SERVEKIT_ACCESS_LOG": "false"}
    with serve_script("llm_serve.py", tmp_path, env=env, args=[str(tiny_model), "--log-prompts"]) as running:
        stream_chat(running.url, f"{SECRET} logged", 2)
        wait_until(lambda: SECRET in running.log())
        entries = [json.loads(line) for line in running.log().splitlines() if line.strip()]
        prompt = next(e for e in entries if SECRET in e["message"])
        assert prompt["logger"] == "servekit.specs.llm.api" and prompt["request_id"] != "-"
        assert not [e for e in entries if e["logger"] == "servekit.access"]


def test_grafana_dashboard_names_real_metrics(server: RunningServer) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(exprs) >= 10
    stream_chat(server.url, "warm", 2)  # every series exists once a request was served
    scraped = {name for name, _ in scrape(server.url)}
    used = {name for expr in exprs for name in re.findall(r"servekit[:_][a-zA-Z0-9_:]+", expr)}
    assert used, "no servekit metric in the dashboard"
    assert used <= scraped, f"not exported: {sorted(used - scraped)}"


def test_root_sends_browsers_to_playground(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/").text == "litserve running"
    browser = httpx.get(f"{server.url}/", headers={"Accept": "text/html"})
    assert browser.status_code == 307 and browser.headers["location"] == "/playground"
