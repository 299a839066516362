"""Allocation-aware strategies (fish_balanced, fish_rank1): exact k, deterministic, and doing what they say."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fish_tuning as ft
from fish_tuning.allocation import tensor_budgets
from test_properties import scores_and_k


@settings(max_examples=150, deadline=None)
@given(scores_and_k(), st.sampled_from(["fish_balanced", "fish_rank1"]), st.floats(0, 1))
def test_exactly_k_and_deterministic(data, strategy, alpha):
    scores, k = data
    mask = ft.select_mask(scores, budget=k, strategy=strategy, alpha=alpha)
    assert mask.num_selected == k
    again = ft.select_mask({n: t.clone() for n, t in scores.items()}, budget=k, strategy=strategy, alpha=alpha)
    assert again.fingerprint() == mask.fingerprint()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.integers(0, 50)), min_size=1, max_size=8), st.floats(0, 1),
       st.data())
def test_tensor_budgets_sum_to_k_within_caps_and_follow_weights(rows, alpha, data):
    mass, sizes = [m for m, _ in rows], [s for _, s in rows]
    if sum(sizes) == 0:
        return
    k = data.draw(st.integers(1, sum(sizes)))
    b = tensor_budgets(mass, sizes, k, alpha)
    assert sum(b) == k and all(0 <= x <= s for x, s in zip(b, sizes))
    w = [(m**alpha if m > 0 else (1.0 if alpha == 0 else 0.0)) for m in mass]
    for i in range(len(b)):  # a tensor below its cap never gets more than one entry beyond a heavier one's share
        for j in range(len(b)):
            if w[i] < w[j] and b[j] < sizes[j]:
                assert b[i] <= b[j] + 1


def test_balanced_alpha_zero_gives_equal_shares_and_top_entries_inside():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(100, generator=g) * 100, "b": torch.rand(100, generator=g), "c": torch.rand(100,
                                                                                                      generator=g)}
    mask = ft.select_mask(scores, budget=30, strategy="fish_balanced", alpha=0.0)
    assert [len(mask.indices[n]) for n in "abc"] == [10, 10, 10]
    for n in "abc":
        assert sorted(mask.indices[n].tolist()) == sorted(torch.topk(scores[n], 10).indices.tolist())
    heavy = ft.select_mask(scores, budget=30, strategy="fish_balanced", alpha=1.0)
    assert len(heavy.indices["a"]) > 25  # mass-proportional: "a" holds ~98% of the mass
    assert mask.meta["alpha"] == 0.0 and heavy.meta["alpha"] == 1.0


def test_rank1_keeps_whole_components_then_fills_exactly():
    r, n_in, n_out = 4, 6, 5
    a = torch.zeros(r, n_in)
    b = torch.zeros(n_out, r)
    a[2], b[:, 2] = 5.0, 5.0  # component 2 is the best
    a[0], b[:, 0] = 1.0, 1.0
    a[0, 3] = 2.0  # best single entry of component 0
    scores = {"m.lora_A.default.weight": a, "m.lora_B.default.weight": b, "m.bias": torch.tensor([0.5, 9.0])}
    size = n_in + n_out
    mask = ft.select_mask(scores, budget=1 + size + 3, strategy="fish_rank1")
    assert mask.num_selected == 1 + size + 3
    keep_a = mask.bool_mask("m.lora_A.default.weight")
    keep_b = mask.bool_mask("m.lora_B.default.weight")
    assert mask.indices["m.bias"].tolist() == [1]  # a single entry with mean 9 comes first
    assert keep_a[2].all() and keep_b[:, 2].all()  # component 2 whole
    assert int(keep_a[0].sum() + keep_b[:, 0].sum()) == 3 and bool(keep_a[0, 3])  # then 3 best of component 0
    assert not keep_a[[1, 3]].any() and not keep_b[:, [1, 3]].any()


def test_alpha_is_checked():
    with pytest.raises(ValueError, match="alpha"):
        ft.select_mask({"a": torch.rand(4)}, budget=2, strategy="fish_balanced", alpha=1.5)


def test_rank1_on_real_lora_matches_lower_rank_count():
    from conftest import cls_batches, lora, tiny_bert

    model = lora(tiny_bert(), r=4)
    fisher = ft.compute_fisher(model, cls_batches(2), num_samples=16, params=ft.peft_candidates(model),
                               progress=False)
    comp = 32 + 32  # one rank-1 component of a 32 -> 32 LoRA pair
    k = 3 * comp
    mask = ft.select_mask(fisher, budget=k, strategy="fish_rank1")
    assert mask.num_selected == k
    rows = sum(int(mask.bool_mask(n).all(dim=1).sum()) for n in mask.names if "lora_A" in n)
    assert rows == 3 and math.isclose(mask.meta["keep"], k / mask.num_candidates)


def test_concentration_shows_where_the_budget_sits():
    rows = torch.zeros(64, 4)
    rows[:2] = 10.0  # two hot hidden dimensions
    scores = {"m.lora_B.default.weight": rows + torch.rand(64, 4) * 0.01}
    hot = ft.select_mask(scores, budget=8, strategy="fish")
    conc, even = hot.concentration(top=2)
    assert conc == 1.0 and even == pytest.approx(2 / 64)
    spread = ft.select_mask(scores, budget=8, strategy="rand", seed=0)
    assert spread.concentration(top=2)[0] < 1.0
    assert "concentration: 100.0% of kept entries" in hot.summary()
