"""Batched transformations of next-token logits, one function per sampling parameter.

Every function works on a ``[rows, vocab]`` float tensor whose rows are the batch rows that need the
transformation (the caller selects them), and takes per-row parameters as tensors or lists. The order
in which the sampler applies them follows vLLM: token masks and logit bias, penalties, temperature,
min_p, then top_k and top_p.

Truncation has two implementations with the same result: ``top_candidates`` works on each row's
``k`` best tokens (a partial top-k instead of a full sort of the vocabulary, which is ~30x slower on
CPU) and reports the rows where top_p would need more than its candidates; ``apply_top_k_top_p``
sorts the whole row and serves those.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from servekit.llm.sampling_params import SamplingParamsError


def validate_logit_bias(logit_bias: dict[int, float] | None, vocab_size: int) -> None:
    """Raise ``SamplingParamsError`` (a ValueError, param ``logit_bias``) for token ids outside the vocab."""
    if not logit_bias:
        return
    bad = sorted(token_id for token_id in logit_bias if not 0 <= int(token_id) < vocab_size)
    if bad:
        raise SamplingParamsError(
            f"logit_bias has token ids out of the vocabulary [0, {vocab_size}): {bad[:10]}", "logit_bias"
        )


def mask_tokens(logits: torch.Tensor, token_ids_per_row: Sequence[Sequence[int]]) -> None:
    """Set the given token ids of each row to -inf, in place (used for min_tokens); ids past the
    vocab are ignored."""
    vocab_size = logits.shape[-1]
    rows: list[int] = []
    cols: list[int] = []
    for row, token_ids in enumerate(token_ids_per_row):
        in_vocab = [t for t in token_ids if 0 <= t < vocab_size]
        rows.extend([row] * len(in_vocab))
        cols.extend(in_vocab)
    if rows:
        logits[torch.tensor(rows), torch.tensor(cols)] = float("-inf")


def add_logit_bias(logits: torch.Tensor, biases: Sequence[dict[int, float]]) -> None:
    """Add each row's ``{token_id: bias}`` to its logits, in place."""
    vocab_size = logits.shape[-1]
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, bias in enumerate(biases):
        validate_logit_bias(bias, vocab_size)
        for token_id, value in bias.items():
            rows.append(row)
            cols.append(int(token_id))
            values.append(float(value))
    if rows:
        logits.index_put_(
            (torch.tensor(rows), torch.tensor(cols)),
            torch.tensor(values, dtype=logits.dtype, device=logits.device),
            accumulate=True,
        )


def padded_token_ids(
    token_ids_per_row: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, longest]`` token ids and a mask of the real (not padding) positions.

    Padding repeats the row's first id, so a scatter of per-token values writes the same value at a
    padded position as at the real one; ids outside the vocab (a tokenizer larger than the model's
    head) are dropped.
    """
    rows = [[t for t in ids if 0 <= t < vocab_size] for ids in token_ids_per_row]
    width = max(max((len(ids) for ids in rows), default=0), 1)
    # Padded on the host as lists: one tensor per call, not one per row.
    padded = [ids + [ids[0] if ids else 0] * (width - len(ids)) for ids in rows]
    lengths = torch.tensor([len(ids) for ids in rows], dtype=torch.int64)
    real = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return torch.tensor(padded, dtype=torch.int64).to(device), real.to(device)


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    presence_penalties: Sequence[float],
    frequency_penalties: Sequence[float],
    repetition_penalties: Sequence[float],
) -> None:
    """Apply vLLM's penalties in place, in its order: repetition, frequency, presence.

    Repetition (HF semantics, over prompt and output tokens): positive logits are divided by the
    penalty, negative ones multiplied. Frequency (per output occurrence) and presence (once per token
    that occurs in the output) are subtracted. Only the logits of tokens that occur are touched.
    """
    vocab_size = logits.shape[-1]
    device = logits.device
    dtype = logits.dtype

    def per_row(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)

    if any(r != 1.0 for r in repetition_penalties):
        seen = [[*prompt, *output] for prompt, output in zip(prompt_token_ids, output_token_ids, strict=True)]
        ids, _ = padded_token_ids(seen, vocab_size, device)
        # Every position of an id computes from the same original logit, so duplicates agree.
        values = logits.gather(1, ids)
        # A penalty below the dtype's smallest normal number (1e-300 in float32 is 0) would turn a
        # logit into inf or NaN, and the draw into an index past the vocabulary: kept finite.
        finfo = torch.finfo(dtype)
        penalty = per_row(repetition_penalties).clamp_(min=finfo.tiny)
        has_ids = torch.tensor([bool(row) for row in seen], device=device).unsqueeze(1)
        penalised = torch.where(values > 0, values / penalty, values * penalty).clamp_(max=finfo.max)
        logits.scatter_(1, ids, torch.where(has_ids, penalised, values))

    use_frequency = any(f != 0.0 for f in frequency_penalties)
    use_presence = any(p != 0.0 for p in presence_penalties)
    if not (use_frequency or use_presence):
        return
    ids, real = padded_token_ids(output_token_ids, vocab_size, device)
    if use_frequency:
        logits.scatter_add_(1, ids, -per_row(frequency_penalties) * real.to(dtype))
    if use_presence:
        has_ids = real[:, :1]
        values = logits.gather(1, ids)
        logits.scatter_(1, ids, values - per_row(presence_penalties) * has_ids.to(dtype))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Mask tokens whose probability is below ``min_p`` times the row's top probability, in place.

    ``min_p`` is ``[rows]``; a row with 0 is left unchanged.
    """
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> None:
    """Apply top_k (optional) then top_p over the renormalised top-k distribution, in place.

    top_p keeps the smallest set of most likely tokens whose probability mass reaches ``top_p`` (the
    most likely token is always kept). ``top_k`` is ``[rows]`` in ``[1, vocab]``; ``top_p`` ``[rows]``.
    """
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        threshold = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < threshold, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_up_to = sorted_probs.cumsum(dim=-1)
    drop = mass_up_to <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    logits.scatter_(1, order, sorted_logits)


def top_candidates(
    logits: torch.Tensor,
    top_k: Sequence[int],
    top_p: Sequence[float],
    min_p: Sequence[float],
    num_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """min_p, top_k and top_p restricted to each row's best tokens.

    ``top_k`` is per row in ``[1, vocab]`` (``vocab`` when disabled). A row with top_k set keeps its
    ``top_k`` best tokens as candidates, a row with only top_p its ``num_candidates`` best (a row
    with neither, the whole vocab: the caller should not send those). Returns
    ``(values, token_ids, incomplete)``: ``[rows, k]`` logits (-inf where masked, best first), their
    token ids, and the rows whose top_p set reaches past their candidates (to redo with
    ``apply_top_k_top_p``). Ties at the top_k boundary are broken by position, not kept.
    """
    vocab_size = logits.shape[-1]
    device = logits.device
    widths = [
        k if k < vocab_size else (min(num_candidates, vocab_size) if p < 1.0 else vocab_size)
        for k, p in zip(top_k, top_p, strict=True)
    ]
    values, token_ids = torch.topk(logits, max(widths), dim=-1)
    position = torch.arange(values.shape[-1], device=device)
    values.masked_fill_(position >= torch.tensor(widths, device=device).unsqueeze(1), float("-inf"))

    min_p_tensor = torch.tensor(min_p, dtype=logits.dtype, device=device)
    if any(m > 0 for m in min_p):
        # p < min_p * p_max  <=>  logit < max_logit + log(min_p)
        threshold = values[:, :1] + min_p_tensor.log().unsqueeze(1)
        values.masked_fill_(values < threshold, float("-inf"))

    incomplete: list[int] = []
    top_p_rows = [row for row, p in enumerate(top_p) if p < 1.0]
    if top_p_rows:
        normaliser = torch.logsumexp(values, dim=-1)
        # Rows with no top_k are normalised over the whole (min_p-filtered) vocabulary.
        open_rows = [row for row in top_p_rows if top_k[row] >= vocab_size and widths[row] < vocab_size]
        if open_rows:
            full = logits if len(open_rows) == logits.shape[0] else logits[open_rows]
            if any(min_p[row] > 0 for row in open_rows):
                floor = full.amax(dim=-1, keepdim=True) + min_p_tensor[open_rows].log().unsqueeze(1)
                full = full.masked_fill(full < floor, float("-inf"))
            normaliser[open_rows] = torch.logsumexp(full, dim=-1)
        probs = (values - normaliser.unsqueeze(1)).exp()
        mass_before = probs.cumsum(dim=-1) - probs
        p_tensor = torch.tensor(top_p, dtype=logits.dtype, device=device).unsqueeze(1)
        values.masked_fill_(mass_before >= p_tensor, float("-inf"))
        covered = probs.sum(dim=-1)
        incomplete = [row for row in open_rows if float(covered[row]) < top_p[row]]
    return values, token_ids, incomplete


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row, drawn from each row's (unnormalised) ``probs`` with its uniform in [0, 1)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(
        uniforms.unsqueeze(1).to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total))
    )
    # The first index whose cumulative mass exceeds the target; zero-probability tokens never qualify.
    # Clamped: a row of NaNs (no mass anywhere) must not index past the vocabulary.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)
