"""Load a Hugging Face checkpoint directory: config.json, safetensors weights, tokenizer, chat template."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from servekit.llm.kernels.quantized import QuantizedTensor
from servekit.llm.loaders.int4_groups import block_rows, float_weight, group_tensors, int4_scheme
from servekit.llm.model_config import ModelConfig
from servekit.llm.tokenizer import Tokenizer, read_tokenizer_config

if TYPE_CHECKING:
    from servekit.llm.loaders import ModelSource

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints store that are recomputed by the model, never loaded.
IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def eos_ids_of(value: Any) -> list[int]:
    """An ``eos_token_id`` field (int, list of ints or null) as a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def rope_settings(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either transformers 4 (``rope_theta`` + ``rope_scaling``)
    or transformers 5 (``rope_parameters``) config keys. ``rope_scaling`` is None for plain RoPE and
    otherwise carries ``rope_type`` (HF's key; the old ``type`` key is translated)."""
    parameters = config.get("rope_parameters")
    theta = config.get("rope_theta")
    scaling: dict[str, Any] | None = None
    if isinstance(parameters, Mapping):
        theta = parameters.get("rope_theta", theta)
        scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
    legacy = config.get("rope_scaling")
    if isinstance(legacy, Mapping):
        scaling = dict(legacy)
    if scaling is not None:
        rope_type = scaling.pop("type", None)
        scaling.setdefault("rope_type", rope_type or "default")
        if scaling["rope_type"] == "default":
            scaling = None
    return float(theta if theta is not None else 10000.0), scaling


def first_of(config: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    """The value of the first of ``keys`` present (and not null) in ``config``: families name the
    same hyper-parameter differently (``hidden_size``, ``n_embd``, ``d_model``)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise KeyError(f"config.json has none of {', '.join(keys)}")
    return default


def model_config_from_hf(
    config: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None
) -> ModelConfig:
    """Translate a transformers config.json to ``ModelConfig``: the fields every family has here,
    then the family's own (``servekit.llm.models.registry``)."""
    from servekit.llm.models.registry import family_of

    model_type = str(config.get("model_type", ""))
    family = family_of(model_type, what="model_type")
    hidden_size = int(first_of(config, "hidden_size", "n_embd", "d_model"))
    num_heads = int(first_of(config, "num_attention_heads", "n_head", "num_heads", "n_heads"))
    head_dim = config.get("head_dim") or hidden_size // num_heads
    rope_theta, rope_scaling = rope_settings(config)
    sliding_window = config.get("sliding_window")
    eos_ids = eos_ids_of((generation_config or {}).get("eos_token_id"))
    for token_id in eos_ids_of(config.get("eos_token_id")):
        if token_id not in eos_ids:
            eos_ids.append(token_id)
    bos = (generation_config or {}).get("bos_token_id", config.get("bos_token_id"))
    model_config = ModelConfig(
        architecture=model_type,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden_size,
        intermediate_size=int(
            first_of(
                config, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", default=4 * hidden_size
            )
        ),
        num_hidden_layers=int(first_of(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(first_of(config, "num_key_value_heads", "num_kv_heads", default=num_heads)),
        head_dim=int(head_dim),
        max_position_embeddings=int(
            first_of(config, "max_position_embeddings", "n_positions", "max_seq_len", default=2048)
        ),
        rms_norm_eps=float(
            first_of(
                config,
                "rms_norm_eps",
                "layer_norm_epsilon",
                "layer_norm_eps",
                "norm_eps",
                "norm_epsilon",
                default=1e-6,
            )
        ),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        hidden_act=str(first_of(config, "hidden_act", "activation_function", "activation", default="silu")),
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        sliding_window=None if sliding_window is None else int(sliding_window),
    )
    family.configure(config, model_config)
    return model_config


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint, in the order the index lists them (or sorted)."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = read_json(index)["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{INDEX_FILE} in {directory} lists missing shards: {missing}")
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {directory} (pytorch .bin files are not supported)"
        )
    return files


def weight_names(directory: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in safetensors_files(directory):
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


def iter_safetensors(directory: Path, *, tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint under its HF name, as stored (dtype and orientation)."""
    from safetensors import safe_open

    for file in safetensors_files(directory):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if name.endswith(IGNORED_WEIGHT_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                yield name, handle.get_tensor(name)


def read_chat_template(directory: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The chat template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = directory / "chat_template.json"
    if json_file.is_file():
        value = read_json(json_file).get("chat_template")
        if isinstance(value, str):
            return value
    return select_chat_template(tokenizer_config.get("chat_template"))


def select_chat_template(value: Any) -> str | None:
    """A template as stored: a string, or a list of ``{"name", "template"}`` (the "default" one wins)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, Mapping)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def load_hf_directory(
    path: str | Path, *, tokenizer_path: str | Path | None = None, name: str | None = None
) -> ModelSource:
    """Load a checkpoint directory into a ``ModelSource`` (weights are read lazily by iter_weights)."""
    from servekit.llm.loaders import ModelSource

    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    config_json = read_json(config_file)
    generation_file = directory / "generation_config.json"
    generation_config = read_json(generation_file) if generation_file.is_file() else {}
    config = model_config_from_hf(config_json, generation_config)
    scheme = int4_scheme(config_json)
    from servekit.llm.models.registry import family_of

    names = weight_names(directory)
    lm_head = family_of(config.architecture).model.names.checkpoint_name("lm_head.weight")
    has_lm_head = lm_head in names or lm_head.removesuffix("weight") + "qweight" in names
    if not config.tie_word_embeddings and not has_lm_head:
        logger.info("%s has no %s: using tied embeddings", directory, lm_head)
        config.tie_word_embeddings = True

    tokenizer_dir = Path(tokenizer_path) if tokenizer_path is not None else directory
    tokenizer_config = read_tokenizer_config(tokenizer_dir)
    tokenizer = Tokenizer.from_dir(tokenizer_dir, extra_eos_token_ids=config.eos_token_ids)
    if not config.eos_token_ids:
        config.eos_token_ids = list(tokenizer.eos_token_ids)
    chat_template = read_chat_template(tokenizer_dir, tokenizer_config)
    tied = config.tie_word_embeddings

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        stored = iter_safetensors(directory, tied=tied)
        if scheme is None:
            return stored
        return group_tensors(scheme, stored, names, float_weight)

    def blocks() -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        assert scheme is not None
        return group_tensors(scheme, iter_safetensors(directory, tied=tied), names, block_rows)

    return ModelSource(
        name=name or directory.resolve().name,
        config=config,
        tokenizer=tokenizer,
        chat_template=chat_template,
        generation_config=generation_config,
        weights_factory=weights,
        blocks_factory=None if scheme is None else blocks,
        path=str(directory),
        quantization=None if scheme is None else scheme.describe(),
    )
