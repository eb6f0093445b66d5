"""Sampler: per-row parameters on crafted logits, statistics, seeds and logprobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from servekit.llm.logits_processors import (
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    inverse_cdf_sample,
    top_candidates,
)
from servekit.llm.sampler import SampledToken, Sampler, greedy_tokens, make_generator
from servekit.llm.sampling_params import SamplingParams, SamplingParamsError

torch.set_num_threads(1)

EOS = 0


@dataclass
class State:
    sampling_params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


def state(prompt: list[int] | None = None, output: list[int] | None = None, **params: Any) -> State:
    sampling_params = SamplingParams(**params)
    return State(sampling_params, prompt or [], output or [], make_generator(sampling_params.seed))


def kept(logits: torch.Tensor) -> set[int]:
    return {int(i) for i in torch.nonzero(torch.isfinite(logits)).flatten()}


# probabilities 0.5, 0.3, 0.15, 0.05 (token 0 most likely)
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def draws(sampler: Sampler, logits_row: torch.Tensor, count: int, **params: Any) -> list[int]:
    """``count`` independent samples of one distribution, drawn as one batch of identical rows."""
    logits = logits_row.unsqueeze(0).repeat(count, 1)
    return [t.token_id for t in sampler.sample(logits, [state(**params) for _ in range(count)])]


# --- greedy ---------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_leaves_logits_untouched() -> None:
    torch.manual_seed(0)
    logits = torch.randn(32, 500)
    before = logits.clone()
    tokens = Sampler([EOS]).sample(logits, [state(temperature=0.0) for _ in range(32)])
    assert [t.token_id for t in tokens] == logits.argmax(-1).tolist()
    assert all(t.logprob is None and t.top_logprobs is None for t in tokens)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_greedy_tokens_agree_with_torch_on_ties_nans_and_strided_rows(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    logits = torch.randn(5, 49152).to(dtype)
    logits[0, 7] = logits[0, 900] = 1e4  # a tie: the first index wins
    logits[1, 123] = float("nan")  # NaN counts as the largest, as in torch
    logits[2] = float("-inf")
    logits[2, 4000] = -1e30
    for rows in (logits, logits[1:4], logits[::2], logits[:, ::3]):
        assert greedy_tokens(rows) == rows.argmax(dim=-1).tolist()
    assert greedy_tokens(logits)[:3] == [7, 123, 4000]


def test_mixed_batch_greedy_rows_are_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 100)
    before = logits.clone()
    states = [state(temperature=0.0 if i % 2 == 0 else 1.0, top_p=0.9, top_k=5) for i in range(6)]
    tokens = Sampler([EOS]).sample(logits, states)
    for i in range(0, 6, 2):
        assert tokens[i].token_id == int(logits[i].argmax())
    for i in range(1, 6, 2):  # sampled rows stay within their top 5
        assert tokens[i].token_id in set(torch.topk(logits[i], 5).indices.tolist())
    assert torch.equal(logits, before)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError):
        Sampler([EOS]).sample(torch.zeros(2, 10), [state()])


# --- truncation masks (exact sets) ----------------------------------------------------------------


@pytest.mark.parametrize(("k", "expected"), [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (4, {0, 1, 2, 3})])
def test_top_k_mask(k: int, expected: set[int]) -> None:
    logits = LOGITS.unsqueeze(0).clone()
    apply_top_k_top_p(logits, torch.tensor([k]), torch.tensor([1.0]))
    assert kept(logits[0]) == expected
    values, token_ids, incomplete = top_candidates(LOGITS.unsqueeze(0), [k], [1.0], [0.0], 2)
    assert candidate_set(values[0], token_ids[0]) == expected
    assert incomplete == []


def test_full_sort_top_k_keeps_ties() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    apply_top_k_top_p(logits, torch.tensor([1]), torch.tensor([1.0]))
    assert kept(logits[0]) == {1, 2}


def candidate_set(values: torch.Tensor, token_ids: torch.Tensor) -> set[int]:
    return {int(t) for t, v in zip(token_ids, values, strict=True) if v > float("-inf")}


def test_candidates_agree_with_the_full_sort() -> None:
    torch.manual_seed(11)
    vocab, rows = 300, 64
    logits = torch.randn(rows, vocab) * torch.rand(rows, 1) * 6
    top_k = [int(k) if k < vocab else vocab for k in torch.randint(1, 2 * vocab, (rows,))]
    top_p = [float(p) if p < 0.9 else 1.0 for p in torch.rand(rows) * 1.2]
    top_p = [p if (k < vocab or p < 1.0) else 0.5 for k, p in zip(top_k, top_p, strict=True)]
    min_p = [float(m) if m < 0.2 else 0.0 for m in torch.rand(rows) * 0.5]
    values, token_ids, incomplete = top_candidates(logits, top_k, top_p, min_p, num_candidates=40)
    assert incomplete  # some rows need more than 40 candidates
    for row in range(rows):
        reference = logits[row : row + 1].clone()
        apply_min_p(reference, torch.tensor([min_p[row]]))
        apply_top_k_top_p(reference, torch.tensor([top_k[row]]), torch.tensor([top_p[row]]))
        if row in incomplete:
            assert top_k[row] == vocab and len(kept(reference[0])) > 40
        else:
            assert candidate_set(values[row], token_ids[row]) == kept(reference[0]), row


def test_inverse_cdf_sample_picks_by_cumulative_mass() -> None:
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75]] * 5)
    uniforms = torch.tensor([0.0, 0.2499, 0.25, 0.9999, 1.0 - 1e-9])
    assert inverse_cdf_sample(probs, uniforms).tolist() == [1, 1, 3, 3, 3]
    # unnormalised rows are scaled by their total
    assert inverse_cdf_sample(torch.tensor([[2.0, 2.0]]), torch.tensor([0.6])).tolist() == [1]


@pytest.mark.parametrize(
    ("p", "expected"), [(0.4, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3})]
)
def test_top_p_mask(p: float, expected: set[int]) -> None:
    logits = LOGITS.unsqueeze(0).clone()
    apply_top_k_top_p(logits, None, torch.tensor([p]))
    assert kept(logits[0]) == expected
    # surviving logits are unchanged (no renormalisation at the logit level)
    assert torch.equal(logits[0][sorted(expected)], LOGITS[sorted(expected)])
    values, token_ids, incomplete = top_candidates(LOGITS.unsqueeze(0), [4], [p], [0.0], 4)
    assert candidate_set(values[0], token_ids[0]) == expected and incomplete == []
    values, token_ids, incomplete = top_candidates(LOGITS.unsqueeze(0), [4], [p], [0.0], 2)
    assert incomplete == ([0] if len(expected) > 2 else [])


@pytest.mark.parametrize(("p", "expected"), [(0.6, {0}), (0.7, {0, 1})])
def test_top_p_applies_to_the_top_k_distribution(p: float, expected: set[int]) -> None:
    # after top_k=2 the distribution is 0.625 / 0.375
    logits = LOGITS.unsqueeze(0).clone()
    apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([p]))
    assert kept(logits[0]) == expected


@pytest.mark.parametrize(
    ("min_p", "expected"), [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0}), (0.05, {0, 1, 2, 3})]
)
def test_min_p_mask(min_p: float, expected: set[int]) -> None:
    logits = LOGITS.unsqueeze(0).clone()
    apply_min_p(logits, torch.tensor([min_p]))
    assert kept(logits[0]) == expected


def test_truncation_through_the_sampler_limits_the_support() -> None:
    sampler = Sampler([EOS])
    torch.manual_seed(2)
    assert set(draws(sampler, LOGITS, 400, top_k=2)) == {0, 1}
    assert set(draws(sampler, LOGITS, 400, top_p=0.75)) == {0, 1}
    assert set(draws(sampler, LOGITS, 400, min_p=0.2)) == {0, 1, 2}
    assert set(draws(sampler, LOGITS, 400, top_k=1)) == {0}
    assert set(draws(sampler, LOGITS, 400)) == {0, 1, 2, 3}


def test_rows_get_their_own_truncation() -> None:
    torch.manual_seed(3)
    rows = 300
    logits = LOGITS.unsqueeze(0).repeat(rows, 1)
    params: list[dict[str, Any]] = [{"top_k": 1}, {"top_p": 0.75}, {"min_p": 0.2}, {}]
    states = [state(**params[i % 4]) for i in range(rows)]
    tokens = [t.token_id for t in Sampler([EOS]).sample(logits, states)]
    support = [set(tokens[i::4]) for i in range(4)]
    assert support == [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}]


# --- statistics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_follow_the_tempered_softmax(temperature: float) -> None:
    torch.manual_seed(4)
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    count = 6000
    tokens = torch.tensor(draws(Sampler([EOS]), logits, count, temperature=temperature))
    frequencies = torch.bincount(tokens, minlength=6).float() / count
    expected = torch.softmax(logits / temperature, dim=-1)
    # ~5 standard deviations of a binomial frequency at p=0.5 with 6000 draws is 0.032
    assert torch.allclose(frequencies, expected, atol=0.03), (frequencies, expected)


def test_top_p_frequencies_are_renormalised() -> None:
    torch.manual_seed(5)
    count = 6000
    tokens = torch.tensor(draws(Sampler([EOS]), LOGITS, count, top_p=0.75))
    frequencies = torch.bincount(tokens, minlength=4).float() / count
    assert torch.allclose(frequencies, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03)


@pytest.mark.parametrize(("top_p_candidates", "padding"), [(1, 0), (1, 36), (2, 36), (3, 36), (256, 36)])
def test_top_p_wider_than_the_candidates_gives_the_same_distribution(
    top_p_candidates: int, padding: int
) -> None:
    # (1, 0): candidates then a full sort; (1, 36), (2, 36): a second, wider candidate tier
    torch.manual_seed(12)
    sampler = Sampler([EOS], top_p_candidates=top_p_candidates)
    vocab = 4 + padding
    logits = torch.cat([LOGITS, torch.full((padding,), -30.0)])
    count = 6000
    tokens = torch.tensor(draws(sampler, logits, count, top_p=0.85, min_p=0.01))
    frequencies = torch.bincount(tokens, minlength=vocab).float() / count
    expected = torch.zeros(vocab)
    expected[:3] = torch.tensor([0.5, 0.3, 0.15]) / 0.95
    assert torch.allclose(frequencies, expected, atol=0.03), frequencies[:4]


# --- seeds ----------------------------------------------------------------------------------------


def run_steps(seeded: State, mates: list[State], position: int, steps: int, vocab: int = 64) -> list[int]:
    """Sample ``steps`` tokens for ``seeded`` inside a batch with ``mates``, from per-step logits."""
    sampler = Sampler([EOS])
    chosen: list[int] = []
    for step in range(steps):
        logits_gen = torch.Generator().manual_seed(1000 + step)
        row = torch.randn(vocab, generator=logits_gen)
        batch = [*mates[:position], seeded, *mates[position:]]
        logits = torch.randn(len(batch), vocab)
        logits[position] = row
        token = sampler.sample(logits, batch)[position].token_id
        seeded.output_token_ids.append(token)
        chosen.append(token)
    return chosen


def test_seeded_request_is_reproducible_whatever_its_batch_mates() -> None:
    params: dict[str, Any] = {"temperature": 1.0, "top_p": 0.95, "seed": 1234}
    alone = run_steps(state(**params), [], 0, 12)
    torch.manual_seed(99)
    mates = [state(), state(temperature=0.0), state(seed=7, top_k=3), state(presence_penalty=1.0)]
    crowded = run_steps(state(**params), mates, 2, 12)
    torch.manual_seed(12345)
    other_mates = [state(seed=1234), state(min_p=0.1)]
    crowded_again = run_steps(state(**params), other_mates, 1, 12)
    assert alone == crowded == crowded_again
    different_seed = run_steps(state(temperature=1.0, top_p=0.95, seed=4321), [], 0, 12)
    assert different_seed != alone


def test_make_generator() -> None:
    assert make_generator(None) is None
    a, b = make_generator(5), make_generator(5)
    assert a is not None and b is not None
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# --- penalties, bias, min_tokens ------------------------------------------------------------------


def test_penalties_exact_values() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5]])
    apply_penalties(
        logits,
        prompt_token_ids=[[0]],
        output_token_ids=[[1, 2, 2]],
        presence_penalties=[0.25],
        frequency_penalties=[0.5],
        repetition_penalties=[2.0],
    )
    # token 0: prompt, positive -> /2. token 1: output once, negative -> *2 - 0.5 - 0.25.
    # token 2: output twice, positive -> /2 - 1.0 - 0.25. tokens 3, 4: untouched.
    expected = torch.tensor([[1.0, -2.75, -1.0, 3.0, -0.5]])
    assert torch.allclose(logits, expected)


def test_a_penalty_below_the_dtype_keeps_logits_finite_and_tokens_in_the_vocab() -> None:
    # 1e-300 is 0 in float32: dividing by it gave inf, multiplying a masked -inf gave NaN, and the
    # draw an index past the vocabulary (the engine loop then failed in the embedding).
    logits = torch.tensor([[2.0, -1.0, float("-inf"), 0.5]])
    apply_penalties(logits, [[0, 1, 2]], [[]], [0.0], [0.0], [1e-300])
    assert not torch.isnan(logits).any() and torch.isfinite(logits[0, [0, 1, 3]]).all()
    assert logits[0, 0] > 1e37 and logits[0, 2] == float("-inf")  # penalised up; masked stays masked
    sampler = Sampler([EOS])
    for temperature in (0.0, 1.0):
        sampled = sampler.sample(
            torch.tensor([[2.0, -1.0, 0.3, 0.5]]),
            [state(prompt=[0, 1], repetition_penalty=1e-300, temperature=temperature, seed=1)],
        )
        assert sampled[0].token_id == 0


def test_inverse_cdf_sample_stays_in_the_vocabulary_on_a_row_without_mass() -> None:
    probs = torch.tensor([[float("nan")] * 4, [0.0, 0.0, 1.0, 0.0]])
    assert inverse_cdf_sample(probs, torch.tensor([0.5, 0.5])).tolist() == [3, 2]


def test_penalties_match_a_token_by_token_reference() -> None:
    torch.manual_seed(13)
    vocab, rows = 30, 8
    logits = torch.randn(rows, vocab) * 3
    prompts = [torch.randint(0, vocab, (int(n),)).tolist() for n in torch.randint(0, 12, (rows,))]
    outputs = [torch.randint(0, vocab, (int(n),)).tolist() for n in torch.randint(0, 12, (rows,))]
    presence = (torch.rand(rows) * 4 - 2).tolist()
    frequency = (torch.rand(rows) * 4 - 2).tolist()
    repetition = (torch.rand(rows) * 1.9 + 0.1).tolist()
    ours = logits.clone()
    apply_penalties(ours, prompts, outputs, presence, frequency, repetition)
    expected = logits.clone()
    for row in range(rows):
        for token in range(vocab):
            value = float(expected[row, token])
            if token in prompts[row] or token in outputs[row]:
                value = value / repetition[row] if value > 0 else value * repetition[row]
            value -= frequency[row] * outputs[row].count(token)
            value -= presence[row] * (token in outputs[row])
            expected[row, token] = value
    assert torch.allclose(ours, expected, atol=1e-5)


def test_repetition_penalty_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    logits = torch.randn(3, 50)
    prompts = [[1, 2, 3], [4, 4], [10]]
    outputs = [[5, 6], [], [10, 11, 11]]
    penalties = [1.3, 0.7, 2.0]
    ours = logits.clone()
    apply_penalties(ours, prompts, outputs, [0.0] * 3, [0.0] * 3, penalties)
    for row in range(3):
        reference = transformers.RepetitionPenaltyLogitsProcessor(penalties[row])
        ids = torch.tensor([prompts[row] + outputs[row]])
        expected = reference(ids, logits[row : row + 1].clone())
        assert torch.allclose(ours[row : row + 1], expected)


def test_penalties_change_the_greedy_choice_only_for_their_row() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0]] * 4)
    states = [
        state([0], [1], temperature=0.0, frequency_penalty=1.0),
        state([1], [], temperature=0.0, repetition_penalty=1.5),  # 3.0/1.5 = 2.0 < 2.5
        state([0], [1], temperature=0.0),
        state([9], [9], temperature=0.0, repetition_penalty=1.5),  # ids past the vocab are ignored
    ]
    tokens = [t.token_id for t in Sampler([EOS]).sample(logits, states)]
    assert tokens == [2, 2, 1, 1]


def test_logit_bias() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0]] * 2)
    states = [state(temperature=0.0, logit_bias={3: 5.0}), state(temperature=0.0, logit_bias={1: -100})]
    assert [t.token_id for t in Sampler([EOS]).sample(logits, states)] == [3, 2]
    torch.manual_seed(7)
    banned = draws(Sampler([EOS]), torch.zeros(4), 300, logit_bias={0: -100.0, 2: -100.0})
    assert set(banned) == {1, 3}


def test_logit_bias_out_of_range_names_the_param() -> None:
    with pytest.raises(SamplingParamsError) as info:
        Sampler([EOS]).sample(torch.zeros(1, 4), [state(logit_bias={4: 1.0})])
    assert info.value.param == "logit_bias"
    assert isinstance(info.value, ValueError)


def test_min_tokens_masks_eos_and_stop_token_ids() -> None:
    sampler = Sampler([EOS, 5])
    logits = torch.tensor([[9.0, 0.0, 8.0, 7.0, 0.0, 8.5]])  # 0 and 5 are eos, 2 a stop token

    def greedy(output: list[int], **params: Any) -> int:
        return sampler.sample(logits, [state(None, output, temperature=0.0, **params)])[0].token_id

    assert greedy([], min_tokens=2) == 2
    assert greedy([], min_tokens=2, stop_token_ids=[2]) == 3
    assert greedy([], min_tokens=2, stop_token_ids=[2, 1000]) == 3  # ids past the vocab are ignored
    assert greedy([1, 1], min_tokens=2, stop_token_ids=[2]) == 0  # reached: unmasked
    assert greedy([], min_tokens=2, ignore_eos=True) == 0  # ignore_eos leaves eos alone
    # sampled rows never draw a masked token either
    torch.manual_seed(8)
    tokens = draws(sampler, torch.zeros(6), 300, min_tokens=1, stop_token_ids=[2])
    assert set(tokens) == {1, 3, 4}


# --- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_raw_model_logprobs() -> None:
    torch.manual_seed(9)
    logits = torch.randn(3, 40)
    raw = torch.log_softmax(logits, dim=-1)
    states = [
        state([1], [2], temperature=0.7, logprobs=3, repetition_penalty=1.5, logit_bias={4: 2.0}),
        state(temperature=0.0, logprobs=0),
        state(temperature=0.0),
    ]
    tokens = Sampler([EOS]).sample(logits, states)
    first: SampledToken = tokens[0]
    assert first.logprob == pytest.approx(float(raw[0, first.token_id]), abs=1e-6)
    assert first.top_logprobs is not None
    top = torch.topk(raw[0], 3)
    assert [t for t, _ in first.top_logprobs] == top.indices.tolist()
    assert [v for _, v in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert tokens[1].top_logprobs == []
    assert tokens[1].logprob == pytest.approx(float(raw[1].max()), abs=1e-6)
    assert tokens[2].logprob is None and tokens[2].top_logprobs is None


def test_prompt_logprobs() -> None:
    torch.manual_seed(10)
    prompt = [3, 1, 4, 1, 5]
    logits = torch.randn(len(prompt), 20)
    raw = torch.log_softmax(logits, dim=-1)
    sampler = Sampler([EOS])
    result = sampler.prompt_logprobs(logits, prompt, num_top=2)
    assert len(result) == len(prompt) and result[0] is None
    for position in range(1, len(prompt)):
        entry = result[position]
        assert entry is not None
        target = prompt[position]
        assert math.isclose(entry[target], float(raw[position - 1, target]), abs_tol=1e-6)
        assert next(iter(entry)) == target  # the prompt token comes first
        for token_id in torch.topk(raw[position - 1], 2).indices.tolist():
            assert math.isclose(entry[token_id], float(raw[position - 1, token_id]), abs_tol=1e-6)
        assert len(entry) in (2, 3)
    # chunked prefill: concatenating chunk results gives the same list
    chunked = sampler.prompt_logprobs(logits[:2], prompt, 2) + sampler.prompt_logprobs(
        logits[2:], prompt, 2, start=2
    )
    assert chunked == result
