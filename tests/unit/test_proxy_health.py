"""Health checks and circuit breakers of proxy nodes, the state file, the config (no processes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from servekit.proxy.config import ProxyConfig, ProxyConfigError
from servekit.proxy.health import Circuit, NodeHealth
from servekit.proxy.registry import Node, Registry
from servekit.proxy.service import parse_load
from servekit.proxy.state import load_state, save_state


def test_healthy_after_two_successes_unhealthy_after_three_failures() -> None:
    health = NodeHealth()
    assert not health.check_succeeded() and not health.healthy
    assert health.check_succeeded() and health.healthy
    assert not health.check_failed() and not health.check_failed() and health.healthy
    health.check_succeeded()  # a success resets the failure count
    health.check_failed()
    health.check_failed()
    assert health.healthy
    assert health.check_failed() and not health.healthy
    assert not health.admits(0.0)


def test_circuit_opens_half_opens_and_closes() -> None:
    health = NodeHealth(failures_to_open=3, cooldown_s=10.0, healthy=True)
    for t in (1.0, 2.0):
        health.request_started(t)
        health.request_failed(t)
    assert health.circuit is Circuit.CLOSED and health.admits(2.0)
    health.request_failed(3.0)
    assert health.circuit is Circuit.OPEN and not health.admits(12.9)
    assert health.admits(13.0)  # cooldown over: one trial
    health.request_started(13.0)
    assert health.circuit is Circuit.HALF_OPEN and not health.admits(13.0)
    health.request_failed(14.0)  # the trial failed: open again, for a full cooldown
    assert health.circuit is Circuit.OPEN and not health.admits(23.0)
    health.request_started(24.0)
    health.request_succeeded()
    assert health.circuit is Circuit.CLOSED and health.admits(24.0)


def test_a_trial_whose_client_left_frees_the_half_open_slot() -> None:
    health = NodeHealth(failures_to_open=1, cooldown_s=1.0, healthy=True)
    health.request_failed(0.0)
    health.request_started(1.0)
    assert not health.admits(1.0)
    health.request_ended()
    assert health.admits(1.0)


def test_registry_candidates_and_models() -> None:
    registry = Registry()
    registry.add(Node("http://a", models=["m1"], health=NodeHealth(healthy=True)))
    registry.add(Node("http://b", models=["m1", "m2"], health=NodeHealth(healthy=False)))
    assert registry.models() == ["m1", "m2"]
    assert [n.url for n in registry.candidates("m1", 0.0)] == ["http://a"]
    assert registry.candidates("m2", 0.0) == []
    registry.add(Node("http://a", models=["m3"]))  # re-registration keeps health
    assert [n.url for n in registry.candidates("m3", 0.0)] == ["http://a"]


def test_state_file_is_atomic_private_and_without_counters(tmp_path: Path) -> None:
    registry = Registry()
    node = registry.add(Node("http://a:1", models=["m"], speed=2.0, api_key="k"))
    node.in_flight = 3
    node.latencies.append(0.5)
    path = tmp_path / "dir" / "state.json"
    save_state(path, registry)
    assert json.loads(path.read_text()) == {
        "nodes": [{"url": "http://a:1", "models": ["m"], "speed": 2.0, "api_key": "k"}]
    }
    assert os.stat(path).st_mode & 0o077 == 0
    assert os.listdir(path.parent) == ["state.json"]  # no temporary file left behind
    loaded = load_state(path)
    assert [(n.url, n.models, n.speed, n.api_key, n.in_flight) for n in loaded] == [
        ("http://a:1", ["m"], 2.0, "k", 0)
    ]
    assert load_state(tmp_path / "absent.json") == []
    path.write_text('{"nodes": [{"url": "nope"}]}')
    with pytest.raises(ProxyConfigError, match="not a servekit proxy state"):
        load_state(path)


def test_config_env_names_and_validation() -> None:
    config = ProxyConfig.resolve(
        {}, {"SERVEKIT_PROXY_PORT": "9000", "SERVEKIT_PROXY_NODES": "http://a:1/, http://b:2"}
    )
    assert config.port == 9000 and config.nodes == ("http://a:1", "http://b:2")
    assert ProxyConfig.resolve({"node": ["http://c:3"]}, {}).nodes == ("http://c:3",)
    assert ProxyConfig.resolve({"state_file": "none"}, {"SERVEKIT_PROXY_STATE_FILE": "/x"}).state_file is None
    with pytest.raises(ProxyConfigError, match="routing_strategy must be"):
        ProxyConfig.resolve({"routing_strategy": "fastest"}, {})
    with pytest.raises(ProxyConfigError, match="SERVEKIT_PROXY_MAX_ATTEMPTS"):
        ProxyConfig.resolve({}, {"SERVEKIT_PROXY_MAX_ATTEMPTS": "0"})
    with pytest.raises(ProxyConfigError, match="http:// or https://"):
        ProxyConfig.resolve({"node": ["127.0.0.1:8000"]}, {})


def test_parse_load_reads_totals_not_per_worker_samples() -> None:
    text = (
        "# HELP servekit:num_requests_running x\n"
        'servekit:num_requests_running{model_name="m"} 3.0\n'
        'servekit:num_requests_running{model_name="m",worker="0"} 3.0\n'
        'vllm:num_requests_waiting{model_name="m"} 2.0\n'
        'servekit:num_kv_blocks{model_name="m"} 100.0\n'
    )
    assert parse_load(text) == 5
