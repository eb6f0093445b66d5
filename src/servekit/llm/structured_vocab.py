"""Describe our tokenizer's vocabulary to ``xgrammar``: each token's encoded string and the encoding.

``xgrammar`` decodes every token back to bytes to decide which tokens a grammar allows next; it has to
know how the vocabulary spells bytes: byte-level BPE (GPT-2 / SmolLM / Qwen / Llama-3: ``Ġ`` for a
space), byte fallback (SentencePiece-style Llama 2 / Mistral: ``▁`` for a space, ``<0x0A>``) or raw.
"""

from __future__ import annotations

import json
from functools import cache
from typing import TYPE_CHECKING, Any

import xgrammar

if TYPE_CHECKING:
    from servekit.llm.tokenizer import Tokenizer

SENTENCEPIECE_SPACE = "\u2581"


@cache
def byte_level_alphabet() -> tuple[str, ...]:
    """The character GPT-2's byte-level BPE writes for each byte value (index = byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: dict[int, str] = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return tuple(table[byte] for byte in range(256))


def _components(node: Any, key: str) -> list[dict[str, Any]]:
    """A tokenizer.json component and, for a ``Sequence``, its parts."""
    if not isinstance(node, dict):
        return []
    parts = node.get(key) if node.get("type") == "Sequence" else None
    return [node, *(part for part in parts or [] if isinstance(part, dict))]


def detect_vocab_type(tokenizer: Tokenizer) -> tuple[xgrammar.VocabType, bool]:
    """The vocabulary's byte encoding and whether encoding prepends a space (SentencePiece style)."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    decoders = _components(spec.get("decoder"), "decoders")
    pre_tokenizers = _components(spec.get("pre_tokenizer"), "pretokenizers")
    normalizers = _components(spec.get("normalizer"), "normalizers")
    types = {part.get("type") for part in decoders + pre_tokenizers}
    if "ByteLevel" in types:
        return xgrammar.VocabType.BYTE_LEVEL, False
    prepends_space = any(
        part.get("type") == "Prepend" and part.get("prepend") == SENTENCEPIECE_SPACE for part in normalizers
    ) or any(
        part.get("type") == "Metaspace" and part.get("prepend_scheme", "always") != "never"
        for part in pre_tokenizers
    )
    if model.get("byte_fallback") or "ByteFallback" in types:
        return xgrammar.VocabType.BYTE_FALLBACK, prepends_space
    return xgrammar.VocabType.RAW, prepends_space


def encode_added_token(content: str, vocab_type: xgrammar.VocabType) -> str:
    """Spell an added token's plain text the way the vocabulary spells ordinary tokens."""
    if vocab_type == xgrammar.VocabType.BYTE_LEVEL:
        alphabet = byte_level_alphabet()
        return "".join(alphabet[byte] for byte in content.encode("utf-8"))
    if vocab_type == xgrammar.VocabType.BYTE_FALLBACK:
        return content.replace(" ", SENTENCEPIECE_SPACE)
    return content


def encoded_vocab(tokenizer: Tokenizer, vocab_type: xgrammar.VocabType) -> list[str]:
    """Every token id's encoded string; special tokens are empty so no grammar ever allows them."""
    backend = tokenizer.backend
    vocab = [""] * tokenizer.vocab_size
    for token, token_id in backend.get_vocab(with_added_tokens=True).items():
        if 0 <= token_id < len(vocab):
            vocab[token_id] = token
    special = set(tokenizer.all_special_ids)
    for token_id, added in backend.get_added_tokens_decoder().items():
        if not 0 <= token_id < len(vocab):
            continue
        if added.special or token_id in special:
            vocab[token_id] = ""
        else:
            vocab[token_id] = encode_added_token(added.content, vocab_type)
    for token_id in special:
        if 0 <= token_id < len(vocab):
            vocab[token_id] = ""
    return vocab


def tokenizer_info(tokenizer: Tokenizer) -> xgrammar.TokenizerInfo:
    """``xgrammar``'s view of ``tokenizer``; its stop tokens are the tokenizer's end-of-sequence ids."""
    vocab_type, add_prefix_space = detect_vocab_type(tokenizer)
    return xgrammar.TokenizerInfo(
        encoded_vocab(tokenizer, vocab_type),
        vocab_type,
        vocab_size=tokenizer.vocab_size,
        stop_token_ids=list(tokenizer.eos_token_ids) or None,
        add_prefix_space=add_prefix_space,
    )
