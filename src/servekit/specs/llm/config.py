"""ServeConfig: the settings of ``servekit serve``, from flags, ``SERVEKIT_<FLAG>`` env vars, and the
env names users of the vLLM serverless worker know (``MODEL_NAME``, ``MAX_MODEL_LEN``, ...).

Precedence: command-line flag, then ``SERVEKIT_<FLAG>``, then the vLLM-worker names, then the default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from servekit.llm.config import DTYPE_CHOICES, QUANTIZATION_CHOICES, canonical_dtype

logger = logging.getLogger(__name__)

REDACTED = "***"
SECRET_FIELDS = frozenset({"api_key"})


@dataclass(frozen=True)
class Setting:
    """One ``servekit serve`` option: its flag, type, default, help and the env names it reads."""

    name: str
    kind: type
    default: Any
    help: str
    aliases: tuple[str, ...] = ()  # vLLM serverless worker env names
    positional: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "model",
        str,
        None,
        "model to serve: an HF checkpoint directory, a .gguf file or a hub id (org/name); "
        "default: the bundled SmolLM2-135M-Instruct",
        ("MODEL_NAME",),
        positional=True,
    ),
    Setting("host", str, "127.0.0.1", "address to listen on"),
    Setting("port", int, 8000, "port to listen on", ("PORT",)),
    Setting(
        "served_model_name",
        str,
        None,
        "model name clients use in requests (default: the model's name)",
        ("OPENAI_SERVED_MODEL_NAME_OVERRIDE", "SERVED_MODEL_NAME"),
    ),
    Setting("tokenizer", str, None, "tokenizer directory or hub id, if not the model's", ("TOKENIZER_NAME",)),
    Setting("revision", str, None, "hub revision of the model", ("MODEL_REVISION",)),
    Setting(
        "max_model_len",
        int,
        None,
        "context length: prompt + output tokens (default: the model's)",
        ("MAX_MODEL_LEN", "MAX_MODEL_LENGTH"),
    ),
    Setting("max_num_seqs", int, 256, "sequences decoded together in one engine step", ("MAX_NUM_SEQS",)),
    Setting(
        "max_num_batched_tokens",
        int,
        None,
        "tokens computed per engine step (default: 2048)",
        ("MAX_NUM_BATCHED_TOKENS",),
    ),
    Setting(
        "dtype", str, "auto", "weights and activations dtype: auto, float32, bfloat16, float16", ("DTYPE",)
    ),
    Setting(
        "quantization",
        str,
        "none",
        "none (weights computed exactly as stored), int8 (int8 weights and activations: several times "
        "faster on CPUs, slightly different outputs), or auto (int8 on CPUs for an already-quantised "
        "checkpoint such as the default Q4_1 GGUF, none otherwise)",
        ("QUANTIZATION",),
    ),
    Setting(
        "kv_cache_dtype",
        str,
        "auto",
        "KV cache dtype: auto (bfloat16 with int8 quantization, else the model's), float32, bfloat16, float16",
        ("KV_CACHE_DTYPE",),
    ),
    Setting(
        "kv_cache_memory",
        str,
        "auto",
        "KV cache size, e.g. 512MiB or 2GiB (default: auto)",
        ("KV_CACHE_MEMORY",),
    ),
    Setting("block_size", int, 16, "tokens per KV-cache block", ("BLOCK_SIZE",)),
    Setting(
        "enable_prefix_caching",
        bool,
        True,
        "reuse the KV cache of shared prompt prefixes",
        ("ENABLE_PREFIX_CACHING",),
    ),
    Setting(
        "chat_template",
        str,
        None,
        "chat template overriding the model's: a file or an inline jinja2 template",
        ("CUSTOM_CHAT_TEMPLATE",),
    ),
    Setting(
        "tool_call_parser",
        str,
        None,
        "tool-call syntax to parse: hermes (also Qwen) or llama3_json (default: by model)",
        ("TOOL_CALL_PARSER",),
    ),
    Setting(
        "reasoning_parser",
        str,
        None,
        "return <think>...</think> text as reasoning_content: think, deepseek_r1, qwen3",
        ("REASONING_PARSER",),
    ),
    Setting(
        "api_key",
        str,
        None,
        "require this key (Authorization: Bearer or X-API-Key) on every route but /health",
        ("LIT_SERVER_API_KEY",),
    ),
    Setting(
        "max_queued_requests",
        int,
        None,
        "waiting requests beyond this get 503 with Retry-After (default: unlimited)",
        ("MAX_CONCURRENCY",),
    ),
    Setting("workers", int, 1, "inference worker processes (each loads the model)", ("WORKERS",)),
    Setting(
        "num_threads",
        int,
        None,
        "torch threads per worker (default: torch's choice)",
        ("NUM_THREADS",),
    ),
    Setting("seed", int, None, "seed for requests without one", ("SEED",)),
    Setting(
        "request_timeout",
        float,
        None,
        "seconds a request may take, queue and stream included (default: no limit)",
        ("REQUEST_TIMEOUT",),
    ),
    Setting(
        "disable_log_requests",
        bool,
        False,
        "do not log each request",
        ("DISABLE_LOG_REQUESTS",),
    ),
    Setting(
        "gpu_memory_utilization",
        float,
        None,
        "accepted for vLLM compatibility; ignored on CPU",
        ("GPU_MEMORY_UTILIZATION",),
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class ServeConfigError(ValueError):
    pass


def env_name(name: str) -> str:
    return "SERVEKIT_" + name.upper()


def parse_value(setting: Setting, raw: Any, origin: str) -> Any:
    if raw is None or not isinstance(raw, str):
        return raw
    text = raw.strip()
    if setting.kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ServeConfigError(f"{origin} must be a boolean (true/false), got {raw!r}")
    if setting.kind in (int, float):
        try:
            return setting.kind(text)
        except ValueError:
            raise ServeConfigError(f"{origin} must be a number, got {raw!r}") from None
    return text


@dataclass
class ServeConfig:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    dtype: str = "auto"
    quantization: str = "none"
    kv_cache_dtype: str = "auto"
    kv_cache_memory: str = "auto"
    block_size: int = 16
    enable_prefix_caching: bool = True
    chat_template: str | None = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    api_key: str | None = None
    max_queued_requests: int | None = None
    workers: int = 1
    num_threads: int | None = None
    seed: int | None = None
    request_timeout: float | None = None
    disable_log_requests: bool = False
    gpu_memory_utilization: float | None = None
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # field -> where its value came from

    @classmethod
    def resolve(
        cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> ServeConfig:
        """Flags (None = not given) win over ``SERVEKIT_<FLAG>``, which wins over the vLLM names."""
        environ = os.environ if env is None else env
        given = flags or {}
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for setting in SETTINGS:
            flag_value = given.get(setting.name)
            if flag_value is not None:
                values[setting.name] = parse_value(setting, flag_value, f"--{_flag(setting.name)}")
                sources[setting.name] = "flag"
                continue
            for name in (env_name(setting.name), *setting.aliases):
                raw = environ.get(name)
                if raw is not None and raw.strip() != "":
                    values[setting.name] = parse_value(setting, raw, name)
                    sources[setting.name] = f"env {name}"
                    break
        config = cls(**values, sources=sources)
        config.validate()
        return config

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ServeConfigError(f"port must be in 1..65535, got {self.port}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ServeConfigError(f"{name} must be at least 1, got {value}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ServeConfigError(
                f"max_queued_requests must be non-negative, got {self.max_queued_requests}"
            )
        # The engine's own lists, checked here so a bad value stops the CLI before any process starts.
        if self.quantization.strip().lower() not in (*QUANTIZATION_CHOICES, "none"):
            raise ServeConfigError(f"quantization must be none, auto or int8, got {self.quantization!r}")
        if canonical_dtype(self.kv_cache_dtype) not in DTYPE_CHOICES:
            raise ServeConfigError(
                f"kv_cache_dtype must be auto, float32, bfloat16 or float16, got {self.kv_cache_dtype!r}"
            )
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ServeConfigError(f"request_timeout must be positive, got {self.request_timeout}")

    def engine_kwargs(self) -> dict[str, Any]:
        """The ``EngineConfig`` fields this config sets."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "revision": self.revision,
            "served_model_name": self.served_model_name,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "kv_cache_dtype": self.kv_cache_dtype,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "block_size": self.block_size,
            "kv_cache_memory": self.kv_cache_memory,
            "enable_prefix_caching": self.enable_prefix_caching,
            "chat_template": self.chat_template,
            "max_queued_requests": self.max_queued_requests,
            "num_threads": self.num_threads,
            "seed": self.seed,
        }
        return kwargs

    def redacted(self) -> dict[str, Any]:
        """The effective configuration, for ``/server_info``: secrets replaced by ``***``."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sources"}
        for name in SECRET_FIELDS:
            if data.get(name):
                data[name] = REDACTED
        data["sources"] = dict(self.sources)
        return data

    def log_ignored(self) -> None:
        if self.gpu_memory_utilization is not None:
            logger.info(
                "gpu_memory_utilization=%s ignored: no GPU; size the KV cache with --kv-cache-memory",
                self.gpu_memory_utilization,
            )


def _flag(name: str) -> str:
    return name.replace("_", "-")


def setting(name: str) -> Setting:
    return _BY_NAME[name]
