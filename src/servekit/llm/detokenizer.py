"""Turn a growing list of output token ids into text deltas, one step at a time.

Decoding each token alone is wrong for two reasons: byte-level BPE tokens can hold part of a UTF-8
character (an emoji may span three tokens), and SentencePiece-style decoders treat a leading ``▁``
differently at the start of a text. So each step decodes a short window of recent tokens twice --
without and with the new tokens -- and emits the difference, holding text back while it ends in an
incomplete character (decoded as U+FFFD).
"""

from __future__ import annotations

from collections.abc import Sequence

from servekit.llm.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context, so the first output token decodes as a continuation.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Per-sequence state. ``add_tokens`` returns the newly completed text; ``text`` is all of it."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        # _ids[prefix_offset:read_offset] is the context already turned into text;
        # _ids[read_offset:] are tokens whose text is not emitted yet.
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""
        self.output_token_ids: list[int] = []

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Append output tokens; return the text they complete ("" while a character is partial)."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        self.output_token_ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            # Nothing new yet, or the text ends inside a multi-byte character: wait for more tokens.
            return ""
        if not full_text.startswith(prefix_text):
            # The decoder rewrote earlier text (rare; e.g. a cleanup rule): fall back to a full decode.
            return self._resync()
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._trim()
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of generation: emit whatever is held back (an incomplete character decodes
        as U+FFFD, exactly as a full decode of the output would show it)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or not full_text.startswith(prefix_text):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def _resync(self) -> str:
        full = self._decode(self.output_token_ids)
        if full.endswith(REPLACEMENT_CHAR) or not full.startswith(self.text):
            return ""
        delta = full[len(self.text) :]
        self.text = full
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    def _trim(self) -> None:
        # Only _ids[prefix_offset:] is ever decoded again; drop the rest to keep memory flat.
        if self._prefix_offset > 64:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )
