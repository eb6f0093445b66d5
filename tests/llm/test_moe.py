"""The sparse-MoE MLP's ways of running its experts give one answer: stacked experts packed for the C
grouped matmul (CPU float32), in PyTorch's grouped matmul (CPU, where it exists), batched over padded
groups (decode), one matmul pair each (uneven or large groups), straight off the stacked weights (a
single token), and the experts as separate layers (quantised ones), all against a per-token
reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from servekit.llm.kernels import kernels_available
from servekit.llm.kernels.expert_matmul import PackedExperts, expert_matmul, expert_order, gated_fits
from servekit.llm.model_config import MoEConfig
from servekit.llm.models import moe as moe_module
from servekit.llm.models.layers import DenseMLP
from servekit.llm.models.linear import Linear
from servekit.llm.models.moe import SparseMoE, StackedExperts

HIDDEN, WIDTH, EXPERTS, TOP_K = 24, 16, 8, 2


def build(
    stacked: bool, seed: int = 0, fused: bool = False, pack: bool = False
) -> tuple[SparseMoE, list[tuple[torch.Tensor, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5

    weights = [(rand(2 * WIDTH, HIDDEN), rand(HIDDEN, WIDTH)) for _ in range(EXPERTS)]
    experts = [
        DenseMLP(Linear(up, pack=False), Linear(down, pack=False), F.silu, True, fused=fused)
        for up, down in weights
    ]
    config = MoEConfig(num_experts=EXPERTS, top_k=TOP_K, intermediate_size=WIDTH, normalize_top_k=True)
    stack = StackedExperts.of(experts, pack=pack) if stacked else None
    assert (stack is not None) == stacked
    return SparseMoE(Linear(rand(EXPERTS, HIDDEN), pack=False), stack or experts, config), weights


def reference(
    moe: SparseMoE, weights: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor
) -> torch.Tensor:
    """Token by token, expert by expert, in float64."""
    probabilities, chosen = moe.route(x)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for token in range(x.shape[0]):
        for slot in range(TOP_K):
            up, down = (w.double() for w in weights[int(chosen[token, slot])])
            h = x[token].double() @ up.t()
            out[token] += float(probabilities[token, slot]) * ((F.silu(h[:WIDTH]) * h[WIDTH:]) @ down.t())
    return out


@pytest.mark.parametrize("tokens", [1, 3, 32, 200])
def test_every_way_of_running_the_experts_gives_the_reference(
    tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
    separate, weights = build(stacked=False)
    expected = reference(separate, weights, x)
    torch.testing.assert_close(separate(x).double(), expected, atol=1e-5, rtol=1e-5)
    # The C SiLU-and-multiply kernel, where it can be built, and the PyTorch operators.
    for fused in sorted({False, kernels_available(torch.float32)}):
        stacked, _ = build(stacked=True, fused=fused)
        assert stacked.experts.fused == fused  # type: ignore[union-attr]
        torch.testing.assert_close(stacked(x).double(), expected, atol=1e-5, rtol=1e-5)  # grouped
        with monkeypatch.context() as patch:
            patch.setattr(StackedExperts, "grouped_runs", lambda self, x: False)
            for padding in (0.0, float("inf")):  # never batched, always batched
                patch.setattr(moe_module, "MAX_PADDING", padding)
                torch.testing.assert_close(stacked(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_top_k_softmax_routing_is_the_renormalised_softmax() -> None:
    """Mixtral's routing, computed as a softmax over the chosen experts' logits, against softmax over
    all experts, top-k, renormalised."""
    moe, _ = build(stacked=True)
    x = torch.randn(50, HIDDEN, generator=torch.Generator().manual_seed(7))
    weights, chosen = moe.route(x)
    probabilities = torch.softmax(moe.router(x).double(), dim=-1)
    expected_chosen = probabilities.topk(TOP_K, dim=-1).indices
    expected = probabilities.gather(1, expected_chosen)
    expected = expected / expected.sum(dim=-1, keepdim=True)
    assert torch.equal(chosen, expected_chosen)
    torch.testing.assert_close(weights.double(), expected, atol=1e-6, rtol=1e-6)


def test_grouped_matmul_runs_on_cpu_where_pytorch_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    stacked, _ = build(stacked=True)
    calls: list[tuple[int, ...]] = []
    original = StackedExperts.grouped

    def spy(self: StackedExperts, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(ends.tolist()))
        return original(self, x, ends)

    monkeypatch.setattr(StackedExperts, "grouped", spy)
    x = torch.randn(10, HIDDEN, generator=torch.Generator().manual_seed(2))
    stacked(x)
    if not hasattr(F, "grouped_mm"):
        assert calls == []
        return
    _, chosen = stacked.route(x)
    assert calls == [tuple(torch.bincount(chosen.view(-1), minlength=EXPERTS).cumsum(0).tolist())]
    calls.clear()
    stacked(x[:1])  # a single token takes its own path
    assert calls == []


def test_batched_path_is_taken_for_even_small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StackedExperts, "grouped_runs", lambda self, x: False)
    stacked, _ = build(stacked=True)
    calls: list[tuple[int, ...]] = []
    original = StackedExperts.batched

    def spy(self: StackedExperts, x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return original(self, x)

    monkeypatch.setattr(StackedExperts, "batched", spy)
    stacked(torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(1)))  # ~16 rows an expert
    assert len(calls) == 1 and calls[0][0] == EXPERTS
    calls.clear()
    stacked(torch.randn(1, HIDDEN))  # 2 rows over 8 experts: padding would be 4x
    assert calls == []


def test_quantised_or_biased_experts_are_not_stacked() -> None:
    up, down = torch.randn(2 * WIDTH, HIDDEN), torch.randn(HIDDEN, WIDTH)
    biased = DenseMLP(Linear(up, torch.zeros(2 * WIDTH), pack=False), Linear(down, pack=False), F.silu, True)
    assert StackedExperts.of([biased]) is None


@pytest.mark.skipif(not kernels_available(torch.float32), reason="needs the C kernels")
@pytest.mark.parametrize("tokens", [1, 3, 32, 200])
def test_packed_experts_give_the_reference(tokens: int) -> None:
    """The C grouped matmul on packed experts, from one token to a prefill's worth, matches the
    float64 reference; only the packed layout is kept."""
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(100 + tokens))
    moe, weights = build(stacked=True, fused=True, pack=True)
    assert isinstance(moe.experts, StackedExperts) and moe.experts.panels is not None
    assert moe.experts.up is None and moe.experts.down is None
    torch.testing.assert_close(moe(x).double(), reference(moe, weights, x), atol=1e-5, rtol=1e-5)


def test_expert_order_sorts_slots_by_expert_stably() -> None:
    if not kernels_available(torch.float32):
        pytest.skip("needs the C kernels")
    chosen = torch.randint(0, EXPERTS, (37, TOP_K), generator=torch.Generator().manual_seed(3))
    order, tokens, ends = expert_order(chosen, EXPERTS)
    flat = chosen.view(-1)
    assert order.tolist() == flat.argsort(stable=True).tolist()
    assert tokens.tolist() == (flat.argsort(stable=True) // TOP_K).tolist()
    assert ends.tolist() == torch.bincount(flat, minlength=EXPERTS).cumsum(0).tolist()
    with pytest.raises(ValueError, match="expert ids"):
        expert_order(torch.tensor([[0, EXPERTS]]), EXPERTS)


@pytest.mark.skipif(not kernels_available(torch.float32), reason="needs the C kernels")
@pytest.mark.parametrize(("in_features", "out_features"), [(24, 16), (7, 37), (64, 100)])
def test_expert_matmul_multiplies_each_group_by_its_expert(in_features: int, out_features: int) -> None:
    """Groups of any size (empty, past a row chunk, past a micro-tile), experts in any order and
    repeated, widths that are no multiple of a panel: each row against a float64 product."""
    generator = torch.Generator().manual_seed(in_features)
    weights = torch.randn(5, in_features, out_features, generator=generator)
    packed = PackedExperts.of(weights)
    for expert in range(5):
        assert torch.equal(packed.unpacked(expert), weights[expert])
    sizes, experts = [3, 0, 1, 61, 7, 13], [4, 0, 2, 1, 4, 3]
    x = torch.randn(sum(sizes), in_features, generator=generator)
    ends = torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    ids = torch.tensor(experts, dtype=torch.int32)
    got = expert_matmul(x, ends, ids, packed)
    rows = [e for e, size in zip(experts, sizes, strict=True) for _ in range(size)]
    expected = torch.stack([x[r].double() @ weights[e].double() for r, e in enumerate(rows)])
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # Rows gathered from x, results scaled and written to permuted rows.
    source = torch.randperm(x.shape[0], generator=generator).to(torch.int32)
    target = torch.randperm(x.shape[0], generator=generator).to(torch.int32)
    scale = torch.rand(x.shape[0], generator=generator)
    shuffled = x[source.long()]  # sorted row r reads shuffled[source.argsort()[r]], that is x[r]
    moved = expert_matmul(shuffled, ends, ids, packed, x_rows=source.argsort().to(torch.int32))
    torch.testing.assert_close(moved.double(), expected, atol=1e-5, rtol=1e-5)
    placed = expert_matmul(x, ends, ids, packed, out_rows=target, scale=scale)
    torch.testing.assert_close(
        placed[target.long()].double(),
        expected * scale[target.long()].double().unsqueeze(1),
        atol=1e-5,
        rtol=1e-5,
    )
    bad_rows = torch.full((x.shape[0],), x.shape[0], dtype=torch.int32)
    with pytest.raises(ValueError, match="in range"):
        expert_matmul(x, ends, ids, packed, x_rows=bad_rows)
    with pytest.raises(ValueError, match="in range"):
        expert_matmul(x, ends, ids, packed, out_rows=bad_rows)
    with pytest.raises(ValueError, match="in range"):
        expert_matmul(x, ends, torch.tensor([4, 0, 2, 1, 4, 5], dtype=torch.int32), packed)
    with pytest.raises(ValueError, match="last group"):
        expert_matmul(x[:-1], ends, torch.tensor(experts, dtype=torch.int32), packed)


@pytest.mark.skipif(not kernels_available(torch.float32), reason="needs the C kernels")
def test_gated_expert_matmul_applies_silu_and_multiply() -> None:
    """The up projection with SiLU-and-multiply in the kernel, against float64; widths whose halves
    are not whole panels are refused."""
    generator = torch.Generator().manual_seed(11)
    columns = 2 * 16 * 3  # three panels per half on AVX2 (two on AVX-512's wider panels: not whole)
    weights = torch.randn(3, 20, columns, generator=generator)
    packed = PackedExperts.of(weights)
    ends, experts = torch.tensor([5, 5, 12], dtype=torch.int32), torch.tensor([2, 0, 1], dtype=torch.int32)
    x = torch.randn(12, 20, generator=generator)
    if not gated_fits(packed):
        with pytest.raises(ValueError, match="gated"):
            expert_matmul(x, ends, experts, packed, gated=True)
        return
    got = expert_matmul(x, ends, experts, packed, gated=True)
    rows = [2] * 5 + [1] * 7
    full = torch.stack([x[r].double() @ weights[e].double() for r, e in enumerate(rows)])
    half = columns // 2
    torch.testing.assert_close(got.double(), F.silu(full[:, :half]) * full[:, half:], atol=1e-5, rtol=1e-5)
