"""The engine's tokenizer: a thin, typed layer over the ``tokenizers`` library.

It is built from a Hugging Face ``tokenizer.json`` plus the special-token settings of
``tokenizer_config.json`` (or from a GGUF file's metadata, see ``loaders.gguf``), and behaves like
``transformers``' fast tokenizer for encoding and decoding, without importing ``transformers``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

logger = logging.getLogger(__name__)

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def special_token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialised AddedToken."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class Tokenizer:
    """Encode and decode text; knows the ids of the special tokens and of every end-of-sequence token."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        extra_special_tokens: Sequence[str] = (),
    ) -> None:
        """``add_bos_token``/``add_eos_token``: when given, they replace the post-processor of
        ``tokenizer.json`` (as transformers does when tokenizer_config.json sets them); when None the
        post-processor decides which special tokens ``encode`` adds."""
        self.backend = backend
        named = [t for t in (bos_token, eos_token, pad_token, unk_token, *extra_special_tokens) if t]
        missing = [t for t in named if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.bos_token_id = self._id_of(bos_token)
        self.eos_token_id = self._id_of(eos_token)
        self.pad_token_id = self._id_of(pad_token)
        self.unk_token_id = self._id_of(unk_token)
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        eos_ids: list[int] = []
        for token_id in (self.eos_token_id, *extra_eos_token_ids):
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(int(token_id))
        self.eos_token_ids: list[int] = eos_ids
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        special = {
            token_id for token_id, added in backend.get_added_tokens_decoder().items() if added.special
        }
        special.update(
            i
            for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id)
            if i is not None
        )
        self.all_special_ids: frozenset[int] = frozenset(special)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path, *, extra_eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        """Load ``tokenizer.json`` and ``tokenizer_config.json`` (and ``special_tokens_map.json``)."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {directory}: servekit needs a fast (tokenizers) tokenizer file"
            )
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = read_tokenizer_config(directory)
        return cls.from_config(backend, config, extra_eos_token_ids=extra_eos_token_ids)

    @classmethod
    def from_config(
        cls,
        backend: BackendTokenizer,
        config: Mapping[str, Any],
        *,
        extra_eos_token_ids: Sequence[int] = (),
    ) -> Tokenizer:
        """Apply tokenizer_config.json-style settings to a backend tokenizer."""
        tokens = {key: special_token_content(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        listed = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        if isinstance(listed, Mapping):
            listed = list(listed.values())
        extra = [t for t in (special_token_content(v) for v in listed) if t]
        # The post-processor in tokenizer.json decides which special tokens encode adds; the
        # add_bos_token/add_eos_token flags only count when there is none (as in transformers 5).
        add_bos = config.get("add_bos_token") if backend.post_processor is None else None
        add_eos = config.get("add_eos_token") if backend.post_processor is None else None
        return cls(
            backend,
            bos_token=tokens["bos_token"],
            eos_token=tokens["eos_token"],
            pad_token=tokens["pad_token"],
            unk_token=tokens["unk_token"],
            add_bos_token=None if add_bos is None and add_eos is None else bool(add_bos),
            add_eos_token=None if add_bos is None and add_eos is None else bool(add_eos),
            extra_eos_token_ids=extra_eos_token_ids,
            extra_special_tokens=extra,
        )

    # -- the contract ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        """``spaces_between_special_tokens`` is accepted for vLLM compatibility; like vLLM with a fast
        tokenizer, the backend's decoder alone decides the spacing."""
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str | None:
        token = self.backend.id_to_token(int(token_id))
        return None if token is None else str(token)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.backend.token_to_id(token)
        return None if token_id is None else int(token_id)

    def __len__(self) -> int:
        return self.vocab_size

    # -- internals --------------------------------------------------------------------------------

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        return None if token_id is None else int(token_id)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        add_bos = add_bos and self.bos_token is not None and self.bos_token_id is not None
        add_eos = add_eos and self.eos_token is not None and self.eos_token_id is not None
        bos = f"{self.bos_token}:0 " if add_bos else ""
        eos = f" {self.eos_token}:0" if add_eos else ""
        single = f"{bos}$A:0{eos}"
        pair = f"{single}{(' ' + str(self.bos_token) + ':1') if add_bos else ''} $B:1" + (
            f" {self.eos_token}:1" if add_eos else ""
        )
        special: list[tuple[str, int]] = []
        if add_bos:
            special.append((str(self.bos_token), int(self.bos_token_id or 0)))
        if add_eos:
            special.append((str(self.eos_token), int(self.eos_token_id or 0)))
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )


def read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json, with special_tokens_map.json filling the special tokens it lacks."""
    config: dict[str, Any] = {}
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
    map_file = directory / "special_tokens_map.json"
    if map_file.is_file():
        special_map = json.loads(map_file.read_text(encoding="utf-8"))
        for key, value in special_map.items():
            if config.get(key) is None:
                config[key] = value
    return config
