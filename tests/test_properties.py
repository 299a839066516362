"""Property tests (hypothesis): selection is exact-k and deterministic, files round-trip, SparseAdamW == AdamW."""

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fish_tuning as ft

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def scores_and_k(draw, min_total=1):
    """A few candidate tensors of any float dtype, values from a small set (many ties), and a budget k."""
    dtype = draw(st.sampled_from(DTYPES))
    shapes = draw(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=2), min_size=1, max_size=4))
    assume(sum(math.prod(s) for s in shapes) >= min_total)
    scores = {}
    for i, shape in enumerate(shapes):
        values = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 3.0, 1e-3]),
                               min_size=math.prod(shape), max_size=math.prod(shape)))
        scores[f"layer.{i}.w"] = torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)
    total = sum(t.numel() for t in scores.values())
    return scores, draw(st.integers(1, total))


def flat_positions(mask, scores):
    out, offset = [], 0
    for name, t in scores.items():
        out += [offset + int(i) for i in mask.indices[name]]
        offset += t.numel()
    return sorted(out)


@settings(max_examples=150, deadline=None)
@given(scores_and_k(), st.sampled_from(["fish", "rev"]))
def test_fish_is_top_k_and_rev_bottom_k_with_ties_to_the_earliest_position(data, strategy):
    scores, k = data
    mask = ft.select_mask(scores, budget=k, strategy=strategy)
    assert mask.num_selected == k
    flat = [float(v) for t in scores.values() for v in t.reshape(-1).double()]
    sign = -1 if strategy == "fish" else 1
    expected = sorted(sorted(range(len(flat)), key=lambda i: (sign * flat[i], i))[:k])
    assert flat_positions(mask, scores) == expected
    again = ft.select_mask({n: t.clone() for n, t in scores.items()}, budget=k, strategy=strategy)
    assert again.fingerprint() == mask.fingerprint()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(40, 400), frac=st.floats(0.1, 0.9), seed=st.integers(0, 2**31 - 2))
def test_rand_same_seed_same_mask_other_seed_other_mask(n, frac, seed):
    k = max(1, min(n - 1, round(frac * n)))
    assume(math.comb(n, k) > 10**9)  # a chance collision of two random masks is then negligible
    scores = {"a.w": torch.zeros(n // 2), "b.w": torch.zeros(n - n // 2)}
    one = ft.select_mask(scores, budget=k, strategy="rand", seed=seed)
    assert one.num_selected == k
    assert ft.select_mask(scores, budget=k, strategy="rand", seed=seed).fingerprint() == one.fingerprint()
    assert ft.select_mask(scores, budget=k, strategy="rand", seed=seed + 1).fingerprint() != one.fingerprint()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scores_and_k(), st.sampled_from(["fish", "rand", "rev"]))
def test_mask_file_round_trip(tmp_path_factory, data, strategy):
    scores, k = data
    mask = ft.select_mask(scores, budget=k, strategy=strategy, seed=7)
    path = tmp_path_factory.mktemp("mask") / "m.safetensors"
    mask.save(path)
    back = ft.FishMask.load(path)
    assert back.fingerprint() == mask.fingerprint()
    assert back.shapes == mask.shapes and back.strategy == mask.strategy and back.seed == mask.seed
    assert all(torch.equal(back.indices[n], mask.indices[n]) for n in mask.names)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 5)
        self.b = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@settings(max_examples=25, deadline=None)
@given(keep=st.floats(0.05, 1.0), lr=st.sampled_from([1e-3, 1e-2, 5e-2]), wd=st.sampled_from([0.0, 0.01, 0.3]),
       seed=st.integers(0, 1000), strategy=st.sampled_from(["fish", "rand"]))
def test_sparse_adamw_equals_masked_adamw(keep, lr, wd, seed, strategy):
    model = Tiny()
    g = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    mask = ft.select_mask(scores, keep=keep, strategy=strategy, seed=seed)
    ref_model, sparse_model = copy.deepcopy(model), copy.deepcopy(model)
    ref = ft.make_optimizer(ref_model, mask, lr=lr, weight_decay=wd, sparse=False)
    sparse = ft.make_optimizer(sparse_model, mask, lr=lr, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(4):
        x = torch.randn(8, 6, generator=g)
        for m, opt in ((ref_model, ref), (sparse_model, sparse)):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for (n, p), q in zip(ref_model.named_parameters(), sparse_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        frozen = ~mask.bool_mask(n)
        assert torch.equal(q.detach()[frozen], before[n][frozen])


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_float_dtype_is_ranked_exactly(dtype):
    values = torch.tensor([0.25, 4.0, 4.0, 1.0, 0.0], dtype=dtype)
    assert ft.select_mask({"w": values}, budget=2).indices["w"].tolist() == [1, 2]
    assert ft.select_mask({"w": values}, budget=2, strategy="rev").indices["w"].tolist() == [0, 4]
