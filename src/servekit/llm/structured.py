"""Structured output: logits processors that make a model's output follow a grammar (with xgrammar).

``json_object_processor``, ``json_schema_processor`` and ``tool_call_processor`` each return a
``GrammarLogitsProcessor`` for ``SamplingParams.logits_processors``. At every step it advances a
grammar matcher over the output tokens it has not seen yet and sets every token the grammar does not
allow next to ``-inf``; once the grammar is complete only end-of-sequence tokens remain.

Compiling a grammar is the slow part, so compiled grammars are cached per tokenizer and grammar.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import xgrammar

from servekit.llm.structured_grammars import (
    GrammarSpec,
    StructuredOutputError,
    json_object_grammar,
    json_schema_grammar,
    tool_call_grammar,
)
from servekit.llm.structured_vocab import tokenizer_info

if TYPE_CHECKING:
    from servekit.llm.tokenizer import Tokenizer

__all__ = [
    "GrammarCompilerCache",
    "GrammarLogitsProcessor",
    "StructuredOutputError",
    "grammar_compiler_for",
    "json_object_processor",
    "json_schema_processor",
    "tool_call_processor",
]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 256


class GrammarCompilerCache:
    """Compiles grammars for one tokenizer and keeps the most recently used ones."""

    def __init__(self, tokenizer: Tokenizer, *, max_entries: int = DEFAULT_CACHE_SIZE) -> None:
        self.info = tokenizer_info(tokenizer)
        self.stop_token_ids = list(tokenizer.eos_token_ids)
        self._compiler = xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._compiled: OrderedDict[str, xgrammar.CompiledGrammar] = OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        """The compiled grammar of ``spec``, from the cache when it was compiled before."""
        key = spec.key
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
        compiled = self._compiler.compile_grammar(spec.build())
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self._max_entries:
                self._compiled.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._compiled)


# One compiler (and its cache) per live tokenizer; dropped with the tokenizer.
_compilers: weakref.WeakKeyDictionary[Any, GrammarCompilerCache] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def grammar_compiler_for(tokenizer: Tokenizer) -> GrammarCompilerCache:
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = GrammarCompilerCache(tokenizer)
            _compilers[tokenizer] = compiler
        return compiler


@dataclass
class _SequenceMatch:
    tokens: list[int]  # the sequence's own output list (kept, so its id() stays unique)
    matcher: xgrammar.GrammarMatcher
    seen: int = 0
    failed: bool = False


class GrammarLogitsProcessor:
    """``processor(output_token_ids, logits_row) -> logits_row`` with the disallowed tokens at -inf.

    Meant for one sequence; if the same instance is shared by several sequences (e.g. the ``n``
    choices of one request share their ``SamplingParams``), each output list gets its own matcher.
    """

    def __init__(self, compiled: xgrammar.CompiledGrammar, stop_token_ids: list[int]) -> None:
        self.compiled = compiled
        self.stop_token_ids = list(stop_token_ids)
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self._bitmask = xgrammar.allocate_token_bitmask(1, self.vocab_size)
        self._sequences: dict[int, _SequenceMatch] = {}

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        state = self._advance(output_token_ids)
        if state.failed or state.matcher.is_completed() or state.matcher.is_terminated():
            return self._only_stop_tokens(logits)
        width = logits.shape[-1]
        masked_width = min(width, self.vocab_size)
        state.matcher.fill_next_token_bitmask(self._bitmask)
        xgrammar.apply_token_bitmask_inplace(logits.view(1, width), self._bitmask, vocab_size=masked_width)
        if width > masked_width:
            logits[masked_width:] = float("-inf")  # the model's padding ids are no tokens at all
        return logits

    def is_completed(self, output_token_ids: list[int]) -> bool:
        """Whether the output so far is a complete match of the grammar."""
        state = self._advance(output_token_ids)
        return not state.failed and state.matcher.is_completed()

    def _advance(self, output_token_ids: list[int]) -> _SequenceMatch:
        state = self._sequences.get(id(output_token_ids))
        if state is None or len(output_token_ids) < state.seen:
            state = _SequenceMatch(output_token_ids, xgrammar.GrammarMatcher(self.compiled))
            self._sequences[id(output_token_ids)] = state
        for token_id in output_token_ids[state.seen :]:
            if state.failed:
                break
            if not state.matcher.accept_token(int(token_id)):
                # A token the mask forbade (e.g. forced by a stop/bias rule applied elsewhere): the
                # grammar cannot continue, so end the sequence instead of producing garbage.
                logger.warning("grammar rejected token %d; ending the sequence", token_id)
                state.failed = True
        state.seen = len(output_token_ids)
        return state

    def _only_stop_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = [t for t in self.stop_token_ids if 0 <= t < logits.shape[-1]]
        if not allowed:
            return logits
        kept = logits[allowed].clone()
        logits.fill_(float("-inf"))
        logits[allowed] = kept
        return logits


def json_object_processor(tokenizer: Tokenizer) -> GrammarLogitsProcessor:
    """Output any valid JSON object."""
    compiler = grammar_compiler_for(tokenizer)
    return GrammarLogitsProcessor(compiler.compile(json_object_grammar()), compiler.stop_token_ids)


def json_schema_processor(tokenizer: Tokenizer, schema: dict[str, Any]) -> GrammarLogitsProcessor:
    """Output JSON valid against ``schema``; an invalid schema raises ``StructuredOutputError``."""
    compiler = grammar_compiler_for(tokenizer)
    return GrammarLogitsProcessor(compiler.compile(json_schema_grammar(schema)), compiler.stop_token_ids)


def tool_call_processor(
    tokenizer: Tokenizer, tools: list[dict[str, Any]], *, tool_name: str | None, style: str
) -> GrammarLogitsProcessor:
    """Output one valid call, in the model's tool-call ``style`` ("hermes" or "llama3"), of
    ``tool_name`` (``tool_choice`` named) or of any of ``tools`` (``tool_choice="required"``)."""
    compiler = grammar_compiler_for(tokenizer)
    grammar = tool_call_grammar(tools, tool_name=tool_name, style=style)
    return GrammarLogitsProcessor(compiler.compile(grammar), compiler.stop_token_ids)
