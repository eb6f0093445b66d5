"""Validation and diagnostics a LitServe user meets, with LitServe's exception types: raised or warned
before any process starts."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import servekit as ls
from servekit import api_checks
from servekit.examples import SimpleLitAPI
from servekit.workers import devices


class SyncPredictAPI(ls.LitAPI):
    def predict(self, x):
        return x


class AsyncPredictAPI(ls.LitAPI):
    async def predict(self, x):
        return x


class BatchHooksAPI(SimpleLitAPI):
    def batch(self, inputs):
        return inputs

    def unbatch(self, output):
        return list(output)


def test_enable_async_needs_an_async_predict() -> None:
    with pytest.raises(ValueError, match="predict must be an async generator or async function"):
        SyncPredictAPI(enable_async=True)
    assert AsyncPredictAPI(enable_async=True).enable_async


def test_model_metadata_must_be_json_serializable() -> None:
    with pytest.raises(ValueError, match="model_metadata must be JSON serializable"):
        ls.LitServer(SimpleLitAPI(), accelerator="cpu", model_metadata={"created": object()})
    server = ls.LitServer(SimpleLitAPI(), accelerator="cpu", model_metadata={"name": "square"})
    assert server.model_metadata == {"name": "square"}


@pytest.mark.parametrize(
    ("run_kwargs", "message"),
    [
        ({"api_server_worker_type": "invalid"}, "api_server_worker_type"),
        ({"num_api_servers": 0}, "num_api_servers must be greater than 0"),
        ({"num_api_servers": -2}, "num_api_servers must be greater than 0"),
    ],
)
def test_bad_run_arguments_fail_before_anything_starts(
    run_kwargs: dict[str, object], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    server = ls.LitServer(SimpleLitAPI(), accelerator="cpu")
    with pytest.raises(ValueError, match=message):
        server.run(host="127.0.0.1", port=8000, **run_kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "client.py").exists()  # nothing was started or written


def test_batch_and_unbatch_without_batching_warn() -> None:
    with pytest.warns(UserWarning, match="max_batch_size parameter was not set"):
        BatchHooksAPI()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchHooksAPI(max_batch_size=4)
        SimpleLitAPI()


class HeavyInitAPI(ls.LitAPI):
    def __init__(self) -> None:
        super().__init__()
        self.model = [0] * 1000  # stands for a model loaded in the constructor

    def predict(self, x):
        return x


class HeavyInitWithSetupAPI(HeavyInitAPI):
    def setup(self, device: str) -> None:
        pass


def test_heavy_init_without_setup_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_checks, "HEAVY_INIT_S", 0.0)  # every constructor counts as heavy
    with pytest.warns(
        RuntimeWarning, match="loading a model or doing other heavy processing inside the constructor"
    ):
        HeavyInitAPI()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HeavyInitWithSetupAPI()
    monkeypatch.setattr(api_checks, "HEAVY_INIT_S", 3600.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HeavyInitAPI()


def test_custom_loops_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="loop must be 'auto'"):
        SimpleLitAPI(loop="custom")
    with pytest.raises(ValueError, match="loop must be 'auto'"):
        ls.LitServer(SimpleLitAPI(), accelerator="cpu", loop=object())
    ls.LitServer(SimpleLitAPI(loop="auto"), accelerator="cpu", loop="auto")


def test_track_requests_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="track_requests=True is not supported"):
        ls.LitServer(SimpleLitAPI(), accelerator="cpu", track_requests=True)
    assert not ls.LitServer(SimpleLitAPI(), accelerator="cpu", track_requests=False).track_requests


def test_fast_queue_is_accepted() -> None:
    # servekit's transport is always ZeroMQ: LitServe's switch to it is accepted either way.
    for fast_queue in (True, False):
        ls.LitServer(SimpleLitAPI(), accelerator="cpu", fast_queue=fast_queue)


def _workers_by_path(server: ls.LitServer) -> dict[str, int]:
    plans, _ = server._plan_workers()
    counts: dict[str, int] = {}
    for plan in plans:
        counts[plan.api.api_path] = counts.get(plan.api.api_path, 0) + 1
    return counts


def _two_apis() -> list[ls.LitAPI]:
    return [SimpleLitAPI(api_path="/a"), SimpleLitAPI(api_path="/b")]


def test_workers_per_device_per_route() -> None:
    by_mapping = ls.LitServer(_two_apis(), accelerator="cpu", workers_per_device={"/a": 2, "/b": 3})
    assert _workers_by_path(by_mapping) == {"/a": 2, "/b": 3}
    by_list = ls.LitServer(_two_apis(), accelerator="cpu", devices=2, workers_per_device=[1, 2])
    assert _workers_by_path(by_list) == {"/a": 2, "/b": 4}
    partial = ls.LitServer(_two_apis(), accelerator="cpu", workers_per_device={"/b": 2})
    assert _workers_by_path(partial) == {"/a": 1, "/b": 2}
    assert _workers_by_path(ls.LitServer(_two_apis(), accelerator="cpu", workers_per_device=2)) == {
        "/a": 2,
        "/b": 2,
    }


def test_workers_per_device_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown api_path values \['/c'\]"):
        ls.LitServer(_two_apis(), accelerator="cpu", workers_per_device={"/a": 1, "/c": 2})
    with pytest.raises(ValueError, match="list length must match the number of APIs"):
        ls.LitServer(_two_apis(), accelerator="cpu", workers_per_device=[1])
    with pytest.raises(ValueError, match="at least 1"):
        ls.LitServer(_two_apis(), accelerator="cpu", workers_per_device={"/a": 0})
    with pytest.raises(TypeError, match="workers_per_device must be"):
        ls.LitServer(_two_apis(), accelerator="cpu", workers_per_device="2")  # type: ignore[arg-type]


def test_cuda_without_gpus_fails_when_the_server_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 0)
    monkeypatch.chdir(tmp_path)
    server = ls.LitServer(SimpleLitAPI(), accelerator="cuda", devices=4, workers_per_device=2)
    assert (server.accelerator, server.devices, server.workers_per_device) == ("cuda", 4, 2)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        server.run(host="127.0.0.1", port=8000)
    assert not (tmp_path / "client.py").exists()


class YieldingEmbedAPI(SimpleLitAPI):
    def predict(self, x):  # type: ignore[no-untyped-def]
        yield x


class YieldingEncodeEmbedAPI(SimpleLitAPI):
    def encode_response(self, output):  # type: ignore[no-untyped-def]
        yield {"embeddings": output}


def test_messages_carry_litserve_phrases() -> None:
    """Messages a LitServe user may search for (or match in their own tests) say what LitServe's say."""
    with pytest.raises(ValueError, match="api_path /predict is already in use by SimpleLitAPI"):
        ls.LitServer([SimpleLitAPI(), SimpleLitAPI()])
    with pytest.raises(ValueError, match="You are using yield in your predict method"):
        ls.LitServer(YieldingEmbedAPI(spec=ls.OpenAIEmbeddingSpec()))
    with pytest.raises(ValueError, match="You are using yield in your encode_response method"):
        ls.LitServer(YieldingEncodeEmbedAPI(spec=ls.OpenAIEmbeddingSpec()))
    with pytest.warns(UserWarning, match="Custom API path detected"):
        ls.LitServer(SimpleLitAPI(api_path="/v2/embeddings", spec=ls.OpenAIEmbeddingSpec()))
