"""Batched next-token sampling with per-request parameters, seeds and logprobs (vLLM semantics).

One call samples one token for every row of a ``[batch, vocab]`` logits tensor. Per-row parameters are
gathered once per call and each transformation runs only on the rows that need it, so a batch of
greedy rows without penalties costs one argmax. Random rows draw one uniform each and pick the
token by inverse CDF (far cheaper on CPU than drawing noise for the whole vocabulary); top_k / top_p
rows sample among their best candidates (``top_candidates``) and sort the vocabulary only when a
top_p set is wider than the candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from servekit.llm.logits_processors import (
    add_logit_bias,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    inverse_cdf_sample,
    mask_tokens,
    top_candidates,
)
from servekit.llm.sampling_params import SamplingParams

DEFAULT_TOP_P_CANDIDATES = 256


class SamplingState(Protocol):
    """What the sampler reads from a sequence (the engine's ``Sequence`` implements it)."""

    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None  # filled when params.logprobs is not None
    top_logprobs: list[tuple[int, float]] | None  # the params.logprobs most likely tokens, best first


def make_generator(seed: int | None) -> torch.Generator | None:
    """A generator for a request's own random draws (on the CPU, whatever the engine's device), or
    None for unseeded requests."""
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The argmax of each row of ``[rows, vocab]`` logits (the first best on ties, a NaN first).

    Float32 CPU logits go through NumPy's vectorised argmax: 8-9x faster than torch's reduction
    here (49k-token vocabulary: 9 against 73 us a row at one thread)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        chosen: list[int] = logits.numpy().argmax(axis=-1).tolist()
    else:
        chosen = logits.argmax(dim=-1).tolist()
    return chosen


def _rows(flags: Sequence[bool]) -> list[int]:
    return [row for row, flag in enumerate(flags) if flag]


class Sampler:
    def __init__(
        self, eos_token_ids: Sequence[int], *, top_p_candidates: int = DEFAULT_TOP_P_CANDIDATES
    ) -> None:
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        # top_p without top_k looks at this many best tokens first and sorts the vocab only when
        # the top_p set is wider.
        self.top_p_candidates = top_p_candidates

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> list[SampledToken]:
        """Sample one token per row; ``logits`` is ``[len(states), vocab]`` and is not modified."""
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits must be [{len(states)}, vocab], got {list(logits.shape)}")
        if not states:
            return []
        logits = logits.float()
        params = [state.sampling_params for state in states]

        processed = self._process_logits(logits, states, params)
        token_ids = self._choose_tokens(processed, states, params)
        return self._with_logprobs(logits, token_ids, params)

    def _process_logits(
        self, logits: torch.Tensor, states: Sequence[SamplingState], params: list[SamplingParams]
    ) -> torch.Tensor:
        """Apply logits processors, min_tokens masks, logit bias and penalties; returns ``logits``
        itself when none apply."""
        masked = [self._tokens_masked_for_min_tokens(state) for state in states]
        mask_rows = _rows([bool(ids) for ids in masked])
        bias_rows = _rows([bool(p.logit_bias) for p in params])
        penalty_rows = _rows(
            [p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1 for p in params]
        )
        processor_rows = _rows([bool(p.logits_processors) for p in params])
        if not (mask_rows or bias_rows or penalty_rows or processor_rows):
            return logits

        processed = logits.clone()
        for row in processor_rows:
            # User processors (e.g. a grammar mask) see the row first, as in vLLM.
            view = processed[row]
            row_logits = view
            for processor in params[row].logits_processors:
                row_logits = processor(states[row].output_token_ids, row_logits)
            if row_logits is not view:
                processed[row] = row_logits
        if mask_rows:
            _on_rows(processed, mask_rows, lambda x: mask_tokens(x, [masked[row] for row in mask_rows]))
        if bias_rows:
            _on_rows(
                processed,
                bias_rows,
                lambda x: add_logit_bias(x, [params[r].logit_bias or {} for r in bias_rows]),
            )
        if penalty_rows:
            _on_rows(
                processed,
                penalty_rows,
                lambda x: apply_penalties(
                    x,
                    prompt_token_ids=[states[row].prompt_token_ids for row in penalty_rows],
                    output_token_ids=[states[row].output_token_ids for row in penalty_rows],
                    presence_penalties=[params[row].presence_penalty for row in penalty_rows],
                    frequency_penalties=[params[row].frequency_penalty for row in penalty_rows],
                    repetition_penalties=[params[row].repetition_penalty for row in penalty_rows],
                ),
            )
        return processed

    def _tokens_masked_for_min_tokens(self, state: SamplingState) -> list[int]:
        params = state.sampling_params
        if len(state.output_token_ids) >= params.min_tokens:
            return []
        stop_ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.extend(self.eos_token_ids)
        return list(dict.fromkeys(stop_ids))

    def _choose_tokens(
        self, processed: torch.Tensor, states: Sequence[SamplingState], params: list[SamplingParams]
    ) -> list[int]:
        greedy = [p.greedy for p in params]
        if all(greedy):
            return greedy_tokens(processed)

        token_ids = [0] * len(params)
        greedy_rows = _rows(greedy)
        if greedy_rows:
            for row, token_id in zip(greedy_rows, greedy_tokens(processed[greedy_rows]), strict=True):
                token_ids[row] = token_id

        random_rows = _rows([not flag for flag in greedy])
        random_params = [params[row] for row in random_rows]
        temperatures = torch.tensor([p.temperature for p in random_params], device=processed.device)
        selected = processed if len(random_rows) == len(params) else processed[random_rows]
        # A new tensor, so the in-place steps below never touch the caller's logits.
        logits = selected / temperatures.unsqueeze(1)
        uniforms = _uniforms([states[row].generator for row in random_rows], logits.device)
        chosen = self._sample_truncated(logits, random_params, uniforms)
        for row, token_id in zip(random_rows, chosen, strict=True):
            token_ids[row] = token_id
        return token_ids

    def _sample_truncated(
        self, logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor
    ) -> list[int]:
        """Apply min_p, top_k and top_p to tempered ``logits`` and draw one token per row."""
        vocab_size = logits.shape[-1]
        chosen = [0] * len(params)
        top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
        restricted = [top_k[i] < vocab_size or params[i].top_p < 1.0 for i in range(len(params))]
        whole_vocab_rows = _rows([not flag for flag in restricted])

        # top_p rows whose set is wider than their candidates retry with more, then sort the vocab.
        pending = _rows(restricted)
        for num_candidates in self._candidate_tiers(vocab_size):
            if not pending:
                break
            values, candidate_ids, incomplete = top_candidates(
                logits if len(pending) == len(params) else logits[pending],
                top_k=[top_k[row] for row in pending],
                top_p=[params[row].top_p for row in pending],
                min_p=[params[row].min_p for row in pending],
                num_candidates=num_candidates,
            )
            picks = inverse_cdf_sample(torch.softmax(values, dim=-1), uniforms[pending])
            sampled = candidate_ids.gather(1, picks.unsqueeze(1)).squeeze(1).tolist()
            for row, token_id in zip(pending, sampled, strict=True):
                chosen[row] = token_id
            pending = [pending[i] for i in incomplete]
        whole_vocab_rows = sorted(whole_vocab_rows + pending)

        if whole_vocab_rows:
            selected = logits if len(whole_vocab_rows) == len(params) else logits[whole_vocab_rows]
            row_params = [params[row] for row in whole_vocab_rows]
            self._apply_min_p(selected, row_params)
            top_p_rows = _rows([p.top_p < 1.0 for p in row_params])
            if top_p_rows:
                top_p = torch.tensor([row_params[i].top_p for i in top_p_rows], device=logits.device)
                _on_rows(selected, top_p_rows, lambda x: apply_top_k_top_p(x, None, top_p))
            picks = inverse_cdf_sample(torch.softmax(selected, dim=-1), uniforms[whole_vocab_rows])
            for row, token_id in zip(whole_vocab_rows, picks.tolist(), strict=True):
                chosen[row] = token_id
        return chosen

    def _candidate_tiers(self, vocab_size: int) -> list[int]:
        tiers = [self.top_p_candidates, 16 * self.top_p_candidates]
        return [tier for tier in tiers if tier < vocab_size] or [vocab_size]

    @staticmethod
    def _apply_min_p(logits: torch.Tensor, params: list[SamplingParams]) -> None:
        rows = _rows([p.min_p > 0 for p in params])
        if rows:
            min_p = torch.tensor([params[r].min_p for r in rows], device=logits.device)
            _on_rows(logits, rows, lambda x: apply_min_p(x, min_p))

    def _with_logprobs(
        self, logits: torch.Tensor, token_ids: list[int], params: list[SamplingParams]
    ) -> list[SampledToken]:
        result = [SampledToken(token_id, None, None) for token_id in token_ids]
        logprob_rows = _rows([p.logprobs is not None for p in params])
        if not logprob_rows:
            return result
        # Raw logprobs: log_softmax of the model's logits, before any sampling transformation.
        logprobs = torch.log_softmax(logits[logprob_rows], dim=-1)
        chosen = torch.tensor([token_ids[row] for row in logprob_rows], device=logits.device)
        chosen_logprobs = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        num_top = [params[row].logprobs or 0 for row in logprob_rows]
        most_top = max(num_top)
        top_values: list[list[float]] = []
        top_ids: list[list[int]] = []
        if most_top:
            top = torch.topk(logprobs, min(most_top, logprobs.shape[-1]), dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for i, row in enumerate(logprob_rows):
            result[row].logprob = chosen_logprobs[i]
            k = num_top[i]
            result[row].top_logprobs = list(zip(top_ids[i][:k], top_values[i][:k], strict=True)) if k else []
        return result

    def prompt_logprobs(
        self, logits: torch.Tensor, prompt_token_ids: Sequence[int], num_top: int, *, start: int = 0
    ) -> list[dict[int, float] | None]:
        """Logprobs of the prompt tokens, from the logits computed at the prompt positions.

        Row ``j`` of ``logits`` holds the logits at position ``start + j`` and so scores prompt token
        ``start + j + 1``. The result covers prompt tokens ``start + 1 .. start + rows`` (those inside
        the prompt), preceded by None for the first prompt token when ``start == 0``; concatenating
        the results of consecutive prefill chunks gives one entry per prompt token. Each entry maps the
        actual prompt token and the ``num_top`` most likely tokens to their logprobs.
        """
        result: list[dict[int, float] | None] = [None] if start == 0 else []
        targets = list(prompt_token_ids[start + 1 : start + 1 + logits.shape[0]])
        if not targets:
            return result
        logprobs = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
        target_tensor = torch.tensor(targets, device=logprobs.device)
        target_logprobs = logprobs.gather(1, target_tensor.unsqueeze(1)).squeeze(1).tolist()
        top_ids: list[list[int]] = [[] for _ in targets]
        top_values: list[list[float]] = [[] for _ in targets]
        if num_top > 0:
            top = torch.topk(logprobs, min(num_top, logprobs.shape[-1]), dim=-1)
            top_ids, top_values = top.indices.tolist(), top.values.tolist()
        for i, target in enumerate(targets):
            entry = {target: target_logprobs[i]}
            for token_id, value in zip(top_ids[i], top_values[i], strict=True):
                entry.setdefault(token_id, value)
            result.append(entry)
        return result


def _on_rows(tensor: torch.Tensor, rows: list[int], transform: Callable[[torch.Tensor], None]) -> None:
    """Apply an in-place ``transform`` to some rows of ``tensor`` (without a copy when it is all rows)."""
    if len(rows) == tensor.shape[0]:
        transform(tensor)
    else:
        selected = tensor[rows]
        transform(selected)
        tensor[rows] = selected


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One uniform draw per row for inverse-CDF sampling.

    A row with its own generator draws from it alone, exactly once per sampled token, so a seeded
    request samples the same tokens whatever else is in the batch; the other rows share one draw.
    Seeded generators live on the CPU (the same seed gives the same tokens on every device); the draws
    cross to ``device`` in one copy.
    """
    seeded = [row for row, generator in enumerate(generators) if generator is not None]
    if not seeded:
        return torch.rand(len(generators), device=device)
    uniforms = torch.rand(len(generators))
    for row in seeded:
        uniforms[row] = torch.rand(1, generator=generators[row])[0]
    return uniforms.to(device, non_blocking=True)
