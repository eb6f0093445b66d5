"""ServeConfig: flags over SERVEKIT_* over the vLLM worker's env names, down to the engine settings."""

from __future__ import annotations

import pytest

from servekit.llm import EngineConfig
from servekit.specs.llm.config import ServeConfig, ServeConfigError


def test_quantization_and_kv_cache_dtype_reach_the_engine() -> None:
    default = ServeConfig.resolve({}, env={})
    assert (default.quantization, default.kv_cache_dtype) == ("none", "auto")
    engine = EngineConfig(**{k: v for k, v in default.engine_kwargs().items() if v is not None})
    assert engine.quantization is None  # the default server computes the weights exactly

    by_vllm_name = ServeConfig.resolve({}, env={"QUANTIZATION": "int8", "KV_CACHE_DTYPE": "float16"})
    assert by_vllm_name.sources["quantization"] == "env QUANTIZATION"
    kwargs = by_vllm_name.engine_kwargs()
    assert (kwargs["quantization"], kwargs["kv_cache_dtype"]) == ("int8", "float16")

    flag_wins = ServeConfig.resolve(
        {"quantization": "auto"}, env={"SERVEKIT_QUANTIZATION": "int8", "QUANTIZATION": "none"}
    )
    assert (flag_wins.quantization, flag_wins.sources["quantization"]) == ("auto", "flag")
    env_wins = ServeConfig.resolve({}, env={"SERVEKIT_QUANTIZATION": "int8", "QUANTIZATION": "none"})
    assert env_wins.quantization == "int8"


def test_unknown_values_are_refused_before_anything_starts() -> None:
    with pytest.raises(ServeConfigError, match="quantization"):
        ServeConfig.resolve({"quantization": "int3"}, env={})
    with pytest.raises(ServeConfigError, match="kv_cache_dtype"):
        ServeConfig.resolve({}, env={"KV_CACHE_DTYPE": "int4"})


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
    assert "quantization must be none, auto or int8" in done.stderr and "Traceback" not in done.stderr
