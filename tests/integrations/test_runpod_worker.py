"""The RunPod worker (``servekit.integrations.runpod``): its handler driven directly as an async
generator on a tiny random checkpoint (every job-input shape, stream batching, errors, settings),
and the real ``runpod`` package's local API server in front of it (``/runsync``, ``/run`` +
``/status``, ``/stream``)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from servekit.integrations.runpod import Worker
from servekit.integrations.runpod_config import WorkerConfig
from servekit.settings import SettingError, setting_values
from tests.e2e.serving import REPO, RunningServer, serve_command
from tests.integrations.conftest import MODEL

pytestmark = pytest.mark.timeout(600)

ENGINE = {"num_threads": 1, "max_model_len": 512}
PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}


def make_worker(model: Path, env: dict[str, str] | None = None) -> Worker:
    return Worker(WorkerConfig.from_env(env or {}, model=str(model), **ENGINE))


@pytest.fixture(scope="module")
def worker(tiny_model: Path) -> Iterator[Worker]:
    running = make_worker(tiny_model)
    yield running
    running.shutdown()


def run(worker: Worker, job_input: dict[str, Any]) -> list[Any]:
    async def collect() -> list[Any]:
        return [item async for item in worker.handler({"id": "job-1", "input": job_input})]

    return asyncio.run(collect())


def text_of(outputs: list[Any], choice: int = 0) -> str:
    return "".join("".join(out["choices"][choice]["tokens"]) for out in outputs)


def sse_chunks(raw: str) -> list[Any]:
    events = [line[len("data: ") :] for line in raw.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


# ------------------------------------------------------------------------------- native input
def test_prompt_matches_the_completions_route(worker: Worker) -> None:
    [output] = run(worker, {"prompt": PROMPT, "sampling_params": GREEDY})
    assert output["usage"]["output"] == 6 and output["usage"]["input"] > 0
    [completion] = run(
        worker, {"openai_route": "/v1/completions", "openai_input": {"prompt": PROMPT, **GREEDY}}
    )
    assert text_of([output]) == completion["choices"][0]["text"]
    assert output["usage"]["input"] == completion["usage"]["prompt_tokens"]


def test_default_sampling_params_are_the_tables(worker: Worker) -> None:
    [output] = run(worker, {"prompt": PROMPT, "sampling_params": {"ignore_eos": True, "seed": 3}})
    assert output["usage"]["output"] == 16  # max_tokens 16
    [again] = run(
        worker, {"prompt": PROMPT, "sampling_params": {"ignore_eos": True, "seed": 3, "temperature": 1.0}}
    )
    assert text_of([again]) == text_of([output])  # temperature 1.0


def test_messages_and_apply_chat_template(worker: Worker) -> None:
    [chat] = run(
        worker, {"openai_route": "/v1/chat/completions", "openai_input": {"messages": MESSAGES, **GREEDY}}
    )
    [from_messages] = run(worker, {"messages": MESSAGES, "sampling_params": GREEDY})
    [templated] = run(
        worker, {"prompt": MESSAGES[0]["content"], "apply_chat_template": True, "sampling_params": GREEDY}
    )
    assert text_of([from_messages]) == text_of([templated]) == chat["choices"][0]["message"]["content"]
    [raw] = run(worker, {"prompt": MESSAGES[0]["content"], "sampling_params": GREEDY})
    assert raw["usage"]["input"] < from_messages["usage"]["input"]  # no template around it


def test_stream_batches_grow_1_3_9_27_50(worker: Worker) -> None:
    params = {"temperature": 0, "max_tokens": 100, "ignore_eos": True}
    outputs = run(worker, {"prompt": PROMPT, "sampling_params": params, "stream": True})
    assert [len(out["choices"][0]["tokens"]) for out in outputs] == [1, 3, 9, 27, 50, 10]
    assert [out["usage"]["output"] for out in outputs] == [1, 4, 13, 40, 90, 100]
    [whole] = run(worker, {"prompt": PROMPT, "sampling_params": params})
    assert text_of(outputs) == text_of([whole])

    custom = {"max_batch_size": 5, "min_batch_size": 2, "batch_size_growth_factor": 2}
    outputs = run(
        worker, {"prompt": PROMPT, "sampling_params": {**params, "max_tokens": 20}, "stream": True, **custom}
    )
    assert [len(out["choices"][0]["tokens"]) for out in outputs] == [2, 4, 5, 5, 4]


def test_n_choices_stream_side_by_side(worker: Worker) -> None:
    params = {"temperature": 1.0, "seed": 1, "n": 2, "max_tokens": 5, "ignore_eos": True}
    outputs = run(worker, {"prompt": PROMPT, "sampling_params": params, "stream": True})
    assert all(len(out["choices"]) == 2 for out in outputs)
    assert outputs[-1]["usage"]["output"] == 10


# ------------------------------------------------------------------------------- OpenAI input
def test_openai_chat_stream_is_raw_sse_in_growing_batches(worker: Worker) -> None:
    body = {"messages": MESSAGES, **GREEDY, "max_tokens": 20}
    [full] = run(worker, {"openai_route": "/v1/chat/completions", "openai_input": body})
    outputs = run(worker, {"openai_route": "/v1/chat/completions", "openai_input": {**body, "stream": True}})
    assert all(isinstance(out, str) for out in outputs)
    chunks = sse_chunks("".join(outputs))
    assert [len(sse_chunks(out + "data: [DONE]\n\n")) for out in outputs[:3]] == [1, 3, 9]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_openai_stream_without_raw_output_is_lists_of_chunks(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker.config.worker, "raw_openai_output", False)
    body = {"prompt": PROMPT, **GREEDY, "stream": True}
    outputs = run(worker, {"openai_route": "/v1/completions", "openai_input": body})
    assert all(isinstance(out, list) for out in outputs)
    chunks = [chunk for out in outputs for chunk in out]
    [full] = run(worker, {"openai_route": "/v1/completions", "openai_input": {**body, "stream": False}})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == full["choices"][0]["text"]


def test_route_body_method_form_and_models(worker: Worker) -> None:
    [chat] = run(
        worker, {"route": "/v1/chat/completions", "method": "POST", "body": {"messages": MESSAGES, **GREEDY}}
    )
    [legacy] = run(
        worker, {"openai_route": "/v1/chat/completions", "openai_input": {"messages": MESSAGES, **GREEDY}}
    )
    assert chat["choices"][0]["message"]["content"] == legacy["choices"][0]["message"]["content"]
    for job_input in ({"route": "/v1/models", "method": "GET"}, {"openai_route": "/v1/models"}):
        [models] = run(worker, job_input)
        assert [m["id"] for m in models["data"]] == [MODEL]
    [wrong_method] = run(worker, {"route": "/v1/models", "method": "POST"})
    assert "GET" in wrong_method["error"]["message"]


def test_served_name_override_and_response_role(tiny_model: Path) -> None:
    env = {
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "my-model",
        "OPENAI_RESPONSE_ROLE": "bot",
        "MAX_CONCURRENCY": "7",
    }
    other = make_worker(tiny_model, env)
    try:
        assert other.concurrency_modifier(1) == 7
        [models] = run(other, {"openai_route": "/v1/models"})
        assert models["data"][0]["id"] == "my-model"
        [chat] = run(
            other, {"openai_route": "/v1/chat/completions", "openai_input": {"messages": MESSAGES, **GREEDY}}
        )
        assert chat["model"] == "my-model" and chat["choices"][0]["message"]["role"] == "bot"
        [missing] = run(
            other,
            {"openai_route": "/v1/chat/completions", "openai_input": {"model": MODEL, "messages": MESSAGES}},
        )
        assert missing["error"]["code"] == "model_not_found"
    finally:
        other.shutdown()


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("job_input", "named"),
    [
        ({"prompt": PROMPT, "sampling_params": {"temperature": -1}}, "temperature"),
        ({"prompt": PROMPT, "sampling_params": {"top_p": 0}}, "top_p"),
        ({"prompt": PROMPT, "sampling_params": {"no_such_param": 1}}, "no_such_param"),
        ({"prompt": PROMPT, "sampling_params": {"max_tokens": 0}}, "max_tokens"),
        ({"prompt": PROMPT, "max_batch_size": 0, "stream": True}, "max_batch_size"),
        ({"sampling_params": {}}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"prompt": "x " * 600}, "context"),
        ({"openai_route": "/v1/embeddings", "openai_input": {}}, "/v1/embeddings"),
    ],
)
def test_errors_are_job_errors_naming_the_parameter(
    worker: Worker, job_input: dict[str, Any], named: str
) -> None:
    [output] = run(worker, job_input)
    message = output["error"]["message"] if isinstance(output["error"], dict) else output["error"]
    assert named in message


def test_openai_errors_are_the_servers_error_bodies(worker: Worker) -> None:
    body = {"messages": MESSAGES, "temperature": 5}
    [output] = run(worker, {"openai_route": "/v1/chat/completions", "openai_input": body})
    assert output["error"]["param"] == "temperature" and output["error"]["type"] == "invalid_request_error"
    [streamed] = run(
        worker, {"openai_route": "/v1/chat/completions", "openai_input": {**body, "stream": True}}
    )
    assert streamed["error"]["param"] == "temperature"


# ---------------------------------------------------------------------------------- settings
def test_both_spellings_of_the_batching_env_vars() -> None:
    docs = WorkerConfig.from_env(
        {"DEFAULT_MIN_BATCH_SIZE": "2", "DEFAULT_BATCH_SIZE_GROWTH_FACTOR": "4"}
    ).worker
    code = WorkerConfig.from_env({"MIN_BATCH_SIZE": "2", "BATCH_SIZE_GROWTH_FACTOR": "4"}).worker
    assert (docs.default_min_batch_size, docs.default_batch_size_growth_factor) == (2, 4)
    assert (code.default_min_batch_size, code.default_batch_size_growth_factor) == (2, 4)
    config = WorkerConfig.from_env(
        {
            "DEFAULT_BATCH_SIZE": "20",
            "RAW_OPENAI_OUTPUT": "0",
            "MAX_CONCURRENCY": "9",
            "MAX_MODEL_LENGTH": "256",
        }
    )
    assert config.worker.default_batch_size == 20 and config.worker.raw_openai_output is False
    assert config.worker.max_concurrency == 9 and config.serve.engine.max_model_len == 256
    assert config.serve.engine.max_queued_requests == 9
    # vLLM's TENSOR_PARALLEL_SIZE is the engine's own tensor parallelism (`servekit serve --tp`).
    assert WorkerConfig.from_env({"TENSOR_PARALLEL_SIZE": "2"}).serve.engine.tp == 2


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"QUANTIZATION": "fp8"}, "QUANTIZATION"),
        ({"TENSOR_PARALLEL_SIZE": "0"}, "TENSOR_PARALLEL_SIZE"),
        ({"LOAD_FORMAT": "pt"}, "LOAD_FORMAT"),
        ({"LOAD_FORMAT": "gguf", "MODEL_NAME": "/models/llama"}, "load_format"),
        ({"DEFAULT_BATCH_SIZE": "0"}, "DEFAULT_BATCH_SIZE"),
        ({"MIN_BATCH_SIZE": "many"}, "MIN_BATCH_SIZE"),
        ({"MAX_MODEL_LENGTH": "-3"}, "MAX_MODEL_LENGTH"),
    ],
)
def test_values_that_cannot_be_honoured_fail_at_start(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingError) as error:
        WorkerConfig.from_env(env)
    assert named in str(error.value)


def test_the_worker_command_stops_at_start_with_the_message(tmp_path: Path) -> None:
    env = {"QUANTIZATION": "fp8", "PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "servekit.integrations.runpod"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "QUANTIZATION" in done.stderr and "fp8" in done.stderr


# ------------------------------------------------------------------------- the local API server
@pytest.fixture(scope="module")
def api(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {"MODEL_NAME": str(tiny_model), "SERVEKIT_NUM_THREADS": "1", "MAX_MODEL_LENGTH": "512"}
    command = [sys.executable, "-m", "servekit.integrations.runpod", "--rp_serve_api"]
    command += ["--rp_api_host", "127.0.0.1", "--rp_api_port", "{port}"]
    with serve_command(command, tmp_path_factory.mktemp("runpod"), env=env, health_path="/") as running:
        yield running


def test_local_api_server_runsync_run_status_stream(api: RunningServer, worker: Worker) -> None:
    def post(path: str, body: dict[str, Any] | None = None) -> Any:
        reply = httpx.post(f"{api.url}{path}", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()

    [expected] = run(worker, {"prompt": PROMPT, "sampling_params": GREEDY})
    sync = post("/runsync", {"input": {"prompt": PROMPT, "sampling_params": GREEDY}})
    assert sync["status"] == "COMPLETED" and sync["output"] == [expected]

    [expected_chat] = run(worker, {"messages": MESSAGES, "sampling_params": GREEDY})
    chat = post("/runsync", {"input": {"messages": MESSAGES, "sampling_params": GREEDY}})
    assert text_of(chat["output"]) == text_of([expected_chat])

    openai_input = {"messages": MESSAGES, **GREEDY}
    routed = post(
        "/runsync", {"input": {"openai_route": "/v1/chat/completions", "openai_input": openai_input}}
    )
    [body] = routed["output"]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == text_of(
        [expected_chat]
    )

    job = post("/run", {"input": {"prompt": PROMPT, "sampling_params": GREEDY}})
    assert job["status"] == "IN_PROGRESS"
    status = post(f"/status/{job['id']}")
    assert status["status"] == "COMPLETED" and status["output"] == [expected]

    params = {"temperature": 0, "max_tokens": 20, "ignore_eos": True}
    job = post("/run", {"input": {"prompt": PROMPT, "sampling_params": params, "stream": True}})
    streamed = post(f"/stream/{job['id']}")
    outputs = [part["output"] for part in streamed["stream"]]
    assert [len(out["choices"][0]["tokens"]) for out in outputs] == [1, 3, 9, 7]


def test_base_path_holds_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", "")  # unset, and restored after the test
    config = WorkerConfig.from_env({"BASE_PATH": str(tmp_path), "HF_TOKEN": "hf_secret"})
    config.prepare_environment()
    assert os.environ["HF_HUB_CACHE"] == str(tmp_path / "huggingface-cache" / "hub")
    assert (tmp_path / "huggingface-cache" / "hub").is_dir()
    assert setting_values(config.worker)["hf_token"] == "***"


def test_hub_model_in_base_path_with_a_tokenizer_revision(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.llm.test_loaders_hub import COMMIT, make_hub_cache

    monkeypatch.setenv("HF_HUB_CACHE", "")  # unset, and restored after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = make_hub_cache(tmp_path / "huggingface-cache" / "hub", "tiny-org/tiny-llama", tiny_model)
    env = {"BASE_PATH": str(tmp_path), "MODEL_NAME": "tiny-org/tiny-llama", "TOKENIZER_REVISION": COMMIT}
    config = WorkerConfig.from_env(env, **ENGINE)
    hub_worker = Worker(config)
    try:
        assert config.serve.engine.tokenizer == str(snapshot)
        [output] = run(hub_worker, {"prompt": PROMPT, "sampling_params": GREEDY})
        assert output["usage"]["output"] == 6
    finally:
        hub_worker.shutdown()
    with pytest.raises(FileNotFoundError, match="revision"):
        WorkerConfig.from_env({**env, "TOKENIZER_REVISION": "f" * 40}).prepare_environment()
