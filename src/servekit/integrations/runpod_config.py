"""The RunPod worker's configuration: the vLLM serverless worker's env names (worker-vllm's README and
code; both spellings where they differ), read with servekit's one settings parser.

The engine's and the server's own names (``MODEL_NAME``, ``MODEL_REVISION``, ``MAX_MODEL_LENGTH``,
``QUANTIZATION``, ``TOKENIZER_NAME``, ``CUSTOM_CHAT_TEMPLATE``, ``GPU_MEMORY_UTILIZATION``,
``DISABLE_LOG_REQUESTS``, ``OPENAI_SERVED_MODEL_NAME_OVERRIDE``, ``MAX_CONCURRENCY``) are
``ServeConfig``'s; this adds what only the worker has. A value servekit cannot honour stops the
worker at start with a message naming it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servekit.settings import SettingError, one_of, read_settings, setting, with_origin
from servekit.specs.llm.config import ServeConfig

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "gguf")
RUNPOD_VOLUME = "/runpod-volume"


class WorkerConfigError(SettingError):
    pass


@dataclass
class WorkerSettings:
    default_batch_size: int = setting(
        50, "most tokens per streamed chunk (dynamic stream batching)", env=("DEFAULT_BATCH_SIZE",)
    )
    default_min_batch_size: int = setting(
        1, "tokens in the first streamed chunk", env=("DEFAULT_MIN_BATCH_SIZE", "MIN_BATCH_SIZE")
    )
    default_batch_size_growth_factor: float = setting(
        3,
        "each streamed chunk is this many times the previous one, up to default_batch_size",
        env=("DEFAULT_BATCH_SIZE_GROWTH_FACTOR", "BATCH_SIZE_GROWTH_FACTOR"),
    )
    raw_openai_output: bool = setting(
        True, "OpenAI routes stream raw SSE text (else lists of chunk objects)", env=("RAW_OPENAI_OUTPUT",)
    )
    max_concurrency: int = setting(100, "jobs one worker runs at once", env=("MAX_CONCURRENCY",))
    openai_response_role: str = setting(
        "assistant", "role of the chat completions' messages", env=("OPENAI_RESPONSE_ROLE",)
    )
    disable_log_stats: bool = setting(
        False, "do not log engine stats after each job", env=("DISABLE_LOG_STATS",)
    )
    base_path: str | None = setting(
        None, "where the hub cache lives (default: /runpod-volume when mounted)", env=("BASE_PATH",)
    )
    load_format: str = setting("auto", "auto, safetensors or gguf", env=("LOAD_FORMAT",))
    hf_token: str | None = setting(
        None, "Hugging Face token (read by huggingface_hub)", env=("HF_TOKEN",), secret=True
    )
    trust_remote_code: bool = setting(
        False, "accepted; servekit never runs a checkpoint's code", env=("TRUST_REMOTE_CODE",)
    )
    tokenizer_revision: str | None = setting(
        None, "hub revision of the tokenizer", env=("TOKENIZER_REVISION",)
    )
    max_parallel_loading_workers: int | None = setting(
        None, "accepted; servekit loads the weights in one pass", env=("MAX_PARALLEL_LOADING_WORKERS",)
    )

    def __post_init__(self) -> None:
        positive = {
            "default_batch_size": self.default_batch_size,
            "default_min_batch_size": self.default_min_batch_size,
            "max_concurrency": self.max_concurrency,
        }
        for name, value in positive.items():
            if value < 1:
                raise WorkerConfigError(f"{name} must be at least 1, got {value}", name)
        if self.default_batch_size_growth_factor < 1:
            raise WorkerConfigError(
                f"default_batch_size_growth_factor must be at least 1, got {self.default_batch_size_growth_factor}",
                "default_batch_size_growth_factor",
            )
        self.load_format = self.load_format.strip().lower()
        if self.load_format not in LOAD_FORMATS:
            raise WorkerConfigError(
                f"load_format must be {one_of(LOAD_FORMATS)} (servekit reads safetensors and GGUF "
                f"checkpoints), got {self.load_format!r}",
                "load_format",
            )


@dataclass
class WorkerConfig:
    serve: ServeConfig
    worker: WorkerSettings = field(default_factory=WorkerSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **flags: Any) -> WorkerConfig:
        """The configuration of the environment (``flags``: ``ServeConfig``/``WorkerSettings`` fields
        that win over it). Raises ``SettingError`` naming the env var of a bad value."""
        environ = os.environ if env is None else env
        values, sources = read_settings(WorkerSettings, flags, environ)
        try:
            worker = WorkerSettings(**values)
        except SettingError as error:
            raise with_origin(error, sources) from None
        serve = ServeConfig.resolve(flags, environ)
        check_load_format(worker.load_format, serve.engine.model)
        return cls(serve, worker)

    def prepare_environment(self) -> None:
        """What must hold before the model loads: the hub cache under ``BASE_PATH``, the tokenizer at
        ``TOKENIZER_REVISION``; the accepted-but-moot settings are logged."""
        worker, engine = self.worker, self.serve.engine
        base = worker.base_path or (RUNPOD_VOLUME if Path(RUNPOD_VOLUME).is_dir() else None)
        if base and not os.environ.get("HF_HUB_CACHE"):
            cache = Path(base) / "huggingface-cache" / "hub"
            cache.mkdir(parents=True, exist_ok=True)
            os.environ["HF_HUB_CACHE"] = str(cache)
        if worker.tokenizer_revision:
            source = engine.tokenizer or engine.model
            if source is None or Path(source).exists():
                raise WorkerConfigError(
                    "tokenizer_revision needs a hub tokenizer (TOKENIZER_NAME or MODEL_NAME as org/name), "
                    f"got {source!r}",
                    "tokenizer_revision",
                )
            from servekit.llm.loaders.hub import resolve_hub_model

            resolved = resolve_hub_model(source, revision=worker.tokenizer_revision, tokenizer_only=True)
            engine.tokenizer = str(resolved)
        if worker.trust_remote_code:
            logger.info("TRUST_REMOTE_CODE accepted: servekit never runs code shipped with a checkpoint")
        if worker.max_parallel_loading_workers is not None:
            logger.info("MAX_PARALLEL_LOADING_WORKERS accepted: servekit loads the weights in one pass")


def check_load_format(load_format: str, model: str | None) -> None:
    if load_format == "auto" or model is None:
        return
    is_gguf = model.endswith(".gguf") or (Path(model).is_dir() and any(Path(model).glob("*.gguf")))
    if (load_format == "gguf") != is_gguf:
        raise WorkerConfigError(
            f"load_format={load_format} does not match the model {model!r} "
            f"({'a GGUF file' if is_gguf else 'not a GGUF file'})",
            "load_format",
        )
