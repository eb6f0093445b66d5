"""Load a GGUF file (llama.cpp's format): architecture, weights under HF names, tokenizer.

Weights are dequantised to float32 with the ``gguf`` package (F16 tensors stay float16), except that
``keep_blocks`` keeps the 2-D weights of the types the quantised kernels compute (Q4_0, Q4_1, Q8_0,
Q4_K, Q6_K) as their blocks (``QuantizedTensor``) for the Llama-layout architectures. llama.cpp's
converter permutes the rows of q_proj/k_proj of Llama-architecture models for its RoPE layout; that
permutation is undone here, so every tensor comes back in the Hugging Face layout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from servekit.llm.kernels.quantized import BLOCK_TYPES, QuantizedTensor
from servekit.llm.loaders.gguf_archs import GGUF_MODEL_TYPES, hf_config_from_gguf, hf_tensors
from servekit.llm.model_config import ModelConfig
from servekit.llm.tokenizer import Tokenizer, read_tokenizer_config

if TYPE_CHECKING:
    import gguf

    from servekit.llm.loaders import ModelSource

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_SKIPPED_TENSORS = ("rope_freqs.weight",)

# Pre-tokenizer split expressions by tokenizer.ggml.pre (llama.cpp's names).
_GPT2_STYLE = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class GGUFMetadata:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, reader: gguf.GGUFReader) -> None:
        self.reader = reader
        self._cache: dict[str, Any] = {}
        self.architecture = str(self.get("general.architecture", "llama"))

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._cache:
            field = self.reader.fields.get(key)
            self._cache[key] = None if field is None else field.contents()
        value = self._cache[key]
        return default if value is None else value

    def arch(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.architecture}.{key}", default)


# -- configuration --------------------------------------------------------------------------------


def model_config_from_gguf(meta: GGUFMetadata, tensor_names: set[str]) -> ModelConfig:
    arch = meta.architecture
    if arch in GGUF_MODEL_TYPES:
        from servekit.llm.loaders.hf import model_config_from_hf

        config = model_config_from_hf(hf_config_from_gguf(meta, tensor_names))
        config.torch_dtype = "float16" if int(meta.get("general.file_type", 0)) == 1 else "float32"
        return config
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted((*SUPPORTED_ARCHITECTURES, *GGUF_MODEL_TYPES)))
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {supported}")
    hidden = int(meta.arch("embedding_length"))
    heads = int(meta.arch("attention.head_count"))
    kv_heads = int(meta.arch("attention.head_count_kv", heads))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    rope_scaling: dict[str, Any] | None = None
    scaling_type = meta.arch("rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling = {
            "rope_type": str(scaling_type),
            "factor": float(meta.arch("rope.scaling.factor", 1.0)),
        }
        original = meta.arch("rope.scaling.original_context_length")
        if original is not None:
            rope_scaling["original_max_position_embeddings"] = int(original)
    if "rope_freqs.weight" in tensor_names:
        logger.warning("GGUF has precomputed rope_freqs (llama3-style RoPE scaling); they are not applied")
    file_type = int(meta.get("general.file_type", 0))
    eos_ids = [
        int(i)
        for i in (meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id"))
        if i is not None
    ]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(meta.arch("vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(meta.arch("feed_forward_length")),
        num_hidden_layers=int(meta.arch("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(meta.arch("attention.key_length", hidden // heads)),
        max_position_embeddings=int(meta.arch("context_length", 2048)),
        rms_norm_eps=float(meta.arch("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.arch("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        torch_dtype="float16" if file_type == 1 else "float32",
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        sliding_window=None,
    )


# -- weights ---------------------------------------------------------------------------------------


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None for tensors the engine does not load."""
    if gguf_name in _SKIPPED_TENSORS:
        return None
    match = _LAYER_NAME.match(gguf_name)
    if match:
        layer, kind, suffix = match.groups()
        if kind not in _LAYER_TENSORS:
            raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    raise ValueError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: within each head it interleaves the two rotary halves
    (rows ``[x0, x1, ..., y0, y1, ...]`` become ``[x0, y0, x1, y1, ...]``)."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return (
        weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
    )


def dequantize_tensor(tensor: Any) -> torch.Tensor:
    import gguf

    qtype = tensor.tensor_type
    if qtype == gguf.GGMLQuantizationType.F32:
        array = np.asarray(tensor.data, dtype=np.float32)
    elif qtype == gguf.GGMLQuantizationType.F16:
        array = np.asarray(tensor.data, dtype=np.float16)
    else:
        array = gguf.quants.dequantize(tensor.data, qtype).astype(np.float32, copy=False)
    shape = [int(d) for d in reversed(tensor.shape.tolist())]
    return torch.from_numpy(np.ascontiguousarray(array).reshape(shape).copy())


def stored_blocks(tensor: Any) -> QuantizedTensor | None:
    """A 2-D tensor of a type the quantised kernels compute, as its blocks; None for any other."""
    qtype = int(tensor.tensor_type)
    if len(tensor.shape) != 2 or qtype not in BLOCK_TYPES:
        return None
    cols, rows = (int(d) for d in tensor.shape.tolist())
    blocks = np.ascontiguousarray(np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1)).copy()
    return QuantizedTensor(torch.from_numpy(blocks), qtype, (rows, cols))


def _unpermute(weight: torch.Tensor | QuantizedTensor, num_heads: int) -> torch.Tensor | QuantizedTensor:
    if isinstance(weight, QuantizedTensor):
        return weight.permute_rows(unpermute_rows(torch.arange(weight.shape[0]), num_heads))
    return unpermute_rows(weight, num_heads)


def iter_gguf_weights(
    reader: gguf.GGUFReader,
    path: Path,
    config: ModelConfig,
    *,
    show_progress: bool = True,
    keep_blocks: bool = False,
) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Dequantise tensor by tensor (the reader memory-maps the file, so only one is in memory), or
    with ``keep_blocks`` keep the quantised 2-D weights the kernels compute as their blocks."""
    from tqdm import tqdm

    permuted = config.architecture == "llama"
    architecture = str(reader.fields["general.architecture"].contents())
    tensors = tqdm(
        reader.tensors,
        desc=f"Loading {path.name}",
        unit="tensor",
        disable=None if show_progress else True,
    )
    for tensor in tensors:
        if architecture in GGUF_MODEL_TYPES:
            yield from hf_tensors(tensor.name, dequantize_tensor(tensor), architecture, config)
            continue
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        weight: torch.Tensor | QuantizedTensor | None = stored_blocks(tensor) if keep_blocks else None
        if weight is None:
            weight = dequantize_tensor(tensor)
        if permuted and ".self_attn.q_proj." in name:
            weight = _unpermute(weight, config.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in name:
            weight = _unpermute(weight, config.num_key_value_heads)
        yield name, weight


# -- tokenizer -------------------------------------------------------------------------------------


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in _GPT2_STYLE:
        logger.warning("unknown GGUF pre-tokenizer %r: using GPT-2's split rules", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Rebuild BPE merges from a SentencePiece vocabulary: a token made of two vocabulary tokens is
    a merge, ranked by the merged token's score (higher first)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, score in zip(tokens, scores, strict=False):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(score), vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def backend_tokenizer_from_gguf(meta: GGUFMetadata) -> tuple[BackendTokenizer, bool]:
    """``(tokenizer, add_bos)`` rebuilt from tokenizer.ggml.* metadata."""
    model_type = str(meta.get("tokenizer.ggml.model", "gpt2"))
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError("the GGUF file has no tokenizer.ggml.tokens")
    token_types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    merges_field = meta.get("tokenizer.ggml.merges")
    if model_type == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in merges_field or []]
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
        backend.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif model_type == "llama":
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        if merges_field:
            merges = [tuple(m.split(" ", 1)) for m in merges_field]
        else:
            merges = _merges_from_scores(tokens, scores)
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[int(unk_id)] if unk_id is not None else None
        backend = BackendTokenizer(
            models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True)
        )
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "▁")]
        decode_steps: list[decoders.Decoder] = [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
        if add_space_prefix:
            steps.insert(0, normalizers.Prepend("▁"))
            decode_steps.append(decoders.Strip(" ", 1, 0))
        backend.normalizer = normalizers.Sequence(steps)
        backend.decoder = decoders.Sequence(decode_steps)
        add_bos_default = True
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {model_type!r} (supported: gpt2, llama)")

    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(token_types)
        if kind == TOKEN_CONTROL or (kind == TOKEN_UNKNOWN and model_type == "llama")
    ]
    if special:
        backend.add_special_tokens(special)
    user_defined = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, kind in enumerate(token_types)
        if kind == TOKEN_USER_DEFINED
    ]
    if user_defined:
        backend.add_tokens(user_defined)
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    return backend, bool(add_bos_default if add_bos is None else add_bos)


def tokenizer_from_gguf(meta: GGUFMetadata, extra_eos_token_ids: Sequence[int]) -> Tokenizer:
    backend, add_bos = backend_tokenizer_from_gguf(meta)
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])

    def token_of(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if not add_bos and not add_eos and backend.post_processor is None:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        add_flags: tuple[bool | None, bool | None] = (None, None)
    else:
        add_flags = (add_bos, add_eos)
    return Tokenizer(
        backend,
        bos_token=token_of("bos_token_id"),
        eos_token=token_of("eos_token_id"),
        pad_token=token_of("padding_token_id"),
        unk_token=token_of("unknown_token_id"),
        add_bos_token=add_flags[0],
        add_eos_token=add_flags[1],
        extra_eos_token_ids=extra_eos_token_ids,
    )


# -- entry point -------------------------------------------------------------------------------------


def load_gguf_file(
    path: str | Path, *, tokenizer_path: str | Path | None = None, name: str | None = None
) -> ModelSource:
    """Read a GGUF file's metadata and tokenizer now; its weights when ``iter_weights`` is called."""
    import gguf

    from servekit.llm.loaders import ModelSource
    from servekit.llm.loaders.hf import read_chat_template

    file = Path(path)
    reader = gguf.GGUFReader(str(file))
    meta = GGUFMetadata(reader)
    config = model_config_from_gguf(meta, {t.name for t in reader.tensors})
    chat_template = meta.get("tokenizer.chat_template")
    if tokenizer_path is not None:
        tokenizer = Tokenizer.from_dir(tokenizer_path, extra_eos_token_ids=config.eos_token_ids)
        chat_template = read_chat_template(
            Path(tokenizer_path), read_tokenizer_config(Path(tokenizer_path))
        ) or (chat_template)
    else:
        tokenizer = tokenizer_from_gguf(meta, config.eos_token_ids)
    generation_config: dict[str, Any] = {"eos_token_id": list(config.eos_token_ids)}
    if config.bos_token_id is not None:
        generation_config["bos_token_id"] = config.bos_token_id

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        return iter_gguf_weights(reader, file, config)  # type: ignore[return-value]  # no blocks kept

    def blocks() -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        return iter_gguf_weights(reader, file, config, keep_blocks=True)

    return ModelSource(
        name=name or file.stem,
        config=config,
        tokenizer=tokenizer,
        chat_template=chat_template if isinstance(chat_template, str) else None,
        generation_config=generation_config,
        weights_factory=weights,
        blocks_factory=blocks,
        path=str(file),
        quantization=stored_quantization(reader),
    )


def stored_quantization(reader: Any) -> str | None:
    """The quantised types the file's 2-D weights are stored in (e.g. "Q4_1, Q6_K"); None if none."""
    import gguf

    unquantised = {
        gguf.GGMLQuantizationType.F32,
        gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.BF16,
    }
    names = {
        tensor.tensor_type.name
        for tensor in reader.tensors
        if len(tensor.shape) == 2 and tensor.tensor_type not in unquantised
    }
    return ", ".join(sorted(names)) or None
