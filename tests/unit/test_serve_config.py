"""ServeConfig: flags over SERVEKIT_* over the vLLM worker's env names, down to the engine settings."""

from __future__ import annotations

import pickle

import pytest

from servekit.llm import EngineConfig, EngineConfigError
from servekit.settings import SettingError, settings_of
from servekit.specs.llm.config import ServeConfig, ServeConfigError


def test_quantization_and_kv_cache_dtype_reach_the_engine() -> None:
    default = ServeConfig.resolve({}, env={})
    assert (default.engine.quantization, default.engine.kv_cache_dtype) == (None, "auto")
    assert default.redacted()["quantization"] == "none"  # the default server computes the weights exactly

    by_vllm_name = ServeConfig.resolve({}, env={"QUANTIZATION": "int8", "KV_CACHE_DTYPE": "float16"})
    assert by_vllm_name.sources["quantization"] == "env QUANTIZATION"
    assert (by_vllm_name.engine.quantization, by_vllm_name.engine.kv_cache_dtype) == ("int8", "float16")

    flag_wins = ServeConfig.resolve(
        {"quantization": "auto"}, env={"SERVEKIT_QUANTIZATION": "int8", "QUANTIZATION": "none"}
    )
    assert (flag_wins.engine.quantization, flag_wins.sources["quantization"]) == ("auto", "flag")
    env_wins = ServeConfig.resolve({}, env={"SERVEKIT_QUANTIZATION": "int8", "QUANTIZATION": "none"})
    assert env_wins.engine.quantization == "int8"


def test_unknown_values_are_refused_before_anything_starts() -> None:
    with pytest.raises(EngineConfigError, match="quantization"):
        ServeConfig.resolve({"quantization": "int3"}, env={})
    with pytest.raises(EngineConfigError, match=r"kv_cache_dtype .*\(from env KV_CACHE_DTYPE\)"):
        ServeConfig.resolve({}, env={"KV_CACHE_DTYPE": "int4"})
    with pytest.raises(ServeConfigError, match=r"port must be in 1\.\.65535, got 0 \(from --port\)"):
        ServeConfig.resolve({"port": "0"}, env={})
    with pytest.raises(SettingError, match="MAX_MODEL_LEN must be an integer"):
        ServeConfig.resolve({}, env={"MAX_MODEL_LEN": "long"})
    with pytest.raises(ServeConfigError, match="allow_terminate_by_client needs api_key"):
        ServeConfig.resolve({"allow_terminate_by_client": True}, env={})
    assert ServeConfig.resolve({"allow_terminate_by_client": True, "api_key": "k"}, env={}).api_key == "k"
    with pytest.raises(ServeConfigError, match="proxy_heartbeat_interval must be positive"):
        ServeConfig.resolve({"proxy_heartbeat_interval": "0"}, env={})


# Every env name that worked before settings were declared on EngineConfig's fields.
VLLM_NAMES = [
    ("MODEL_NAME", "/models/m", "model", "/models/m"),
    ("TOKENIZER_NAME", "/models/t", "tokenizer", "/models/t"),
    ("MODEL_REVISION", "v2", "revision", "v2"),
    ("SERVED_MODEL_NAME", "m", "served_model_name", "m"),
    ("OPENAI_SERVED_MODEL_NAME_OVERRIDE", "m", "served_model_name", "m"),
    ("MAX_MODEL_LEN", "1024", "max_model_len", 1024),
    ("MAX_MODEL_LENGTH", "1024", "max_model_len", 1024),
    ("MAX_NUM_SEQS", "8", "max_num_seqs", 8),
    ("MAX_NUM_BATCHED_TOKENS", "512", "max_num_batched_tokens", 512),
    ("DTYPE", "bf16", "dtype", "bfloat16"),
    ("QUANTIZATION", "int8", "quantization", "int8"),
    ("KV_CACHE_DTYPE", "half", "kv_cache_dtype", "float16"),
    ("KV_CACHE_MEMORY", "1MB", "kv_cache_memory", 1_000_000),
    ("BLOCK_SIZE", "32", "block_size", 32),
    ("ENABLE_PREFIX_CACHING", "false", "enable_prefix_caching", False),
    ("CUSTOM_CHAT_TEMPLATE", "{{ messages }}", "chat_template", "{{ messages }}"),
    ("MAX_CONCURRENCY", "3", "max_queued_requests", 3),
    ("NUM_THREADS", "2", "num_threads", 2),
    ("SEED", "7", "seed", 7),
    ("SERVEKIT_NUM_KV_BLOCKS", "40", "num_kv_blocks", 40),
    ("SERVEKIT_ENABLE_CHUNKED_PREFILL", "0", "enable_chunked_prefill", False),
    ("SERVEKIT_FLUSH_DENORMAL", "no", "flush_denormal", False),
    ("PORT", "9000", "port", 9000),
    ("LIT_SERVER_API_KEY", "k", "api_key", "k"),
    ("WORKERS", "2", "workers", 2),
    ("REQUEST_TIMEOUT", "2.5", "request_timeout", 2.5),
    ("TOOL_CALL_PARSER", "hermes", "tool_call_parser", "hermes"),
    ("REASONING_PARSER", "think", "reasoning_parser", "think"),
    ("DISABLE_LOG_REQUESTS", "true", "disable_log_requests", True),
    ("GPU_MEMORY_UTILIZATION", "0.9", "gpu_memory_utilization", 0.9),
    ("SERVEKIT_DEBUG_ERRORS", "1", "debug_errors", True),
]


@pytest.mark.parametrize(("env_name", "raw", "name", "expected"), VLLM_NAMES)
def test_every_env_name_sets_its_setting(env_name: str, raw: str, name: str, expected: object) -> None:
    config = ServeConfig.resolve({}, env={env_name: raw})
    assert config.redacted()[name] == ("***" if name == "api_key" else expected)
    holder = config.engine if hasattr(config.engine, name) else config
    assert getattr(holder, name) == expected
    assert config.sources == {name: f"env {env_name}"}


def test_precedence_flag_then_servekit_name_then_vllm_name_then_default() -> None:
    env = {"SERVEKIT_MAX_MODEL_LEN": "300", "MAX_MODEL_LEN": "200", "MAX_MODEL_LENGTH": "100"}
    assert ServeConfig.resolve({"max_model_len": "400"}, env=env).engine.max_model_len == 400
    assert ServeConfig.resolve({}, env=env).engine.max_model_len == 300
    del env["SERVEKIT_MAX_MODEL_LEN"]
    assert ServeConfig.resolve({}, env=env).engine.max_model_len == 200
    del env["MAX_MODEL_LEN"]
    assert ServeConfig.resolve({}, env=env).engine.max_model_len == 100
    assert ServeConfig.resolve({}, env={}).engine.max_model_len is None
    assert ServeConfig.resolve({}, env={}).sources == {}


def test_engine_from_env_reads_the_same_names_with_the_same_parser() -> None:
    env = {"MAX_MODEL_LENGTH": "128", "SERVEKIT_KV_CACHE_MEMORY": "2KiB", "ENABLE_PREFIX_CACHING": "off"}
    direct = EngineConfig.from_env(env, seed=3)
    assert direct == ServeConfig.resolve({"seed": "3"}, env=env).engine
    assert (direct.max_model_len, direct.kv_cache_memory, direct.enable_prefix_caching) == (128, 2048, False)


def test_the_resolved_config_is_what_a_worker_gets() -> None:
    config = ServeConfig.resolve({"api_key": "k", "max_model_len": "64"}, env={})
    assert pickle.loads(pickle.dumps(config)) == config


def test_help_shows_every_setting_with_its_env_names(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from servekit.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as done:
        main(["serve", "-h"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    settings = [*settings_of(EngineConfig), *settings_of(ServeConfig)]
    assert len(settings) > 25
    for setting in settings:
        assert (setting.flag if setting.name != "model" else "[model]") in text
        assert f"env: {', '.join(setting.env_names)})" in text


def test_the_cli_reports_a_bad_value_without_a_traceback() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "servekit.cli", "serve", "--quantization", "int3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert (
        "quantization must be none, auto, int8, awq or gptq" in done.stderr and "Traceback" not in done.stderr
    )


def test_gguf_weights_is_a_serve_flag_and_shown_in_server_info() -> None:
    from servekit.cli import build_parser

    assert ServeConfig.resolve({}, env={}).redacted()["gguf_weights"] == "blocks"
    args = build_parser().parse_args(["serve", "--gguf-weights", "dequantize"])
    flagged = ServeConfig.resolve(vars(args), env={})
    assert (flagged.engine.gguf_weights, flagged.sources["gguf_weights"]) == ("dequantize", "flag")
    assert (
        ServeConfig.resolve({}, env={"SERVEKIT_GGUF_WEIGHTS": "dequantize"}).engine.gguf_weights
        == "dequantize"
    )
    with pytest.raises(EngineConfigError, match="gguf_weights"):
        ServeConfig.resolve({"gguf_weights": "fp4"}, env={})
