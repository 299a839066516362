"""Allocation apart from strategy (select_mask), the shuffled control, and the scores beyond the raw Fisher."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert
from fish_tuning import scores as sc
from fish_tuning.fisher import gradient_moments
from fish_tuning.loglik import per_sample_log_likelihood


def _scores(seed=0, shapes=((4, 30), (30, 4), (4, 30), (30, 4), (50,))):
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.rand(s, generator=g) ** 3 for i, s in enumerate(shapes)}


def _counts(mask):
    return {n: int(i.numel()) for n, i in mask.indices.items()}


def test_uniform_allocation_is_equal_density_and_top_k_inside_each_tensor():
    scores = _scores()
    mask = ft.select_mask(scores, budget=70, allocation="uniform")
    assert mask.num_selected == 70 and mask.meta["allocation"] == "uniform"
    n_total = sum(s.numel() for s in scores.values())
    for name, s in scores.items():
        ideal = 70 * s.numel() / n_total
        assert abs(_counts(mask)[name] - ideal) < 1  # largest remainders: within one entry of the exact share
        # brute force: the tensor's count of highest scores, ties to the earlier position
        order = sorted(range(s.numel()), key=lambda j: (-float(s.reshape(-1)[j]), j))
        assert mask.indices[name].tolist() == sorted(order[: _counts(mask)[name]])


def test_mass_allocation_is_fish_balanced():
    scores = _scores(1)
    a = ft.select_mask(scores, budget=33, strategy="fish_balanced", alpha=0.5)
    b = ft.select_mask(scores, budget=33, strategy="fish", allocation="mass", alpha=0.5)
    assert a.fingerprint() == b.fingerprint() and a.meta["alpha"] == b.meta["alpha"] == 0.5


def test_shuffled_control_keeps_fish_counts_at_random_positions():
    scores = _scores(2)
    fish = ft.select_mask(scores, budget=40)
    assert len(set(_counts(fish).values())) > 1  # the global top-k is uneven across tensors
    shuffled = ft.select_mask(scores, strategy="rand", seed=3, allocation=fish)  # k from the allocation
    again = ft.select_mask(scores, strategy="rand", seed=3, allocation=fish)
    other = ft.select_mask(scores, strategy="rand", seed=4, allocation=fish)
    assert _counts(shuffled) == _counts(fish) and shuffled.num_selected == 40
    assert shuffled.fingerprint() == again.fingerprint() != other.fingerprint() != fish.fingerprint()
    assert shuffled.meta["allocation"] == f"mask:{fish.fingerprint()}"
    # a mapping of counts works the same way; rev fills the counts with the lowest scores
    rev = ft.select_mask(scores, strategy="rev", allocation=_counts(fish))
    assert _counts(rev) == _counts(fish)
    for name, s in scores.items():
        kept = s.reshape(-1)[rev.indices[name]]
        rest = s.reshape(-1)[[j for j in range(s.numel()) if j not in set(rev.indices[name].tolist())]]
        assert kept.numel() == 0 or rest.numel() == 0 or float(kept.max()) <= float(rest.min())


def test_allocation_errors_name_the_fix():
    scores = _scores()
    fish = ft.select_mask(scores, budget=10)
    with pytest.raises(ValueError, match="omit keep/budget"):
        ft.select_mask(scores, budget=11, allocation=fish)
    with pytest.raises(ValueError, match="allocation must be one of"):
        ft.select_mask(scores, budget=10, allocation="erk")
    with pytest.raises(ValueError, match="needs allocation='global'"):
        ft.select_mask(scores, budget=10, strategy="fish_rank1", allocation="uniform")
    with pytest.raises(ValueError, match="lacks 't4'"):
        ft.select_mask(scores, allocation={n: 1 for n in list(scores)[:4]})
    with pytest.raises(ValueError, match=r"integer in \[0, 50\]"):
        ft.select_mask(scores, allocation={**_counts(fish), "t4": 51})
    with pytest.raises(ValueError, match="fixes its own allocation"):
        ft.FishConfig(keep=0.1, strategy="fish_balanced", allocation="uniform")


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6), frac=st.floats(0.01, 1.0),
       allocation=st.sampled_from(["global", "uniform", "mass"]), strategy=st.sampled_from(["fish", "rev", "rand"]),
       seed=st.integers(0, 5))
def test_every_allocation_keeps_exactly_k_deterministically(sizes, frac, allocation, strategy, seed):
    g = torch.Generator().manual_seed(seed)
    scores = {f"p{i}": torch.rand(n, generator=g).round(decimals=1) for i, n in enumerate(sizes)}  # many ties
    k = max(1, round(frac * sum(sizes)))
    a = ft.select_mask(scores, budget=k, strategy=strategy, allocation=allocation, seed=seed)
    b = ft.select_mask(scores, budget=k, strategy=strategy, allocation=allocation, seed=seed)
    assert a.num_selected == k and a.fingerprint() == b.fingerprint()
    assert all(0 <= c <= scores[n].numel() for n, c in _counts(a).items())
    if allocation == "uniform":
        assert all(abs(c - k * scores[n].numel() / sum(sizes)) < 1 for n, c in _counts(a).items())
    c = ft.select_mask(scores, strategy=strategy, allocation=a, seed=seed + 1)
    assert _counts(c) == _counts(a)


# ------------------------------------------------------------------------------------------ scores
def _per_sample_grads(model, batches, names):
    """Brute force: one backward per sample of log p(y|x)."""
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    model.eval()
    for b in batches:
        for i in range(b["labels"].shape[0]):
            row = {k: v[i: i + 1] for k, v in b.items()}
            logits = model(**{k: v for k, v in row.items() if k != "labels"}).logits
            ll = per_sample_log_likelihood(logits, row["labels"]).sum()
            grads = torch.autograd.grad(ll, [params[n] for n in names])
            for n, gr in zip(names, grads):
                out[n].append(gr.detach().double())
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("engine", ["vectorized", "loop"])
def test_gradient_moments_match_the_per_sample_loop(engine):
    torch.manual_seed(0)
    model = lora(tiny_bert())
    names = ft.peft_candidates(model)
    batches = cls_batches(2, 6)
    m = gradient_moments(model, batches, num_samples=12, params=names, engine=engine, progress=False)
    ref = _per_sample_grads(model, batches, names)
    assert m.num_samples == 12
    for n in names:
        scale = float(ref[n].abs().max())  # a mean of cancelling float32 terms: error relative to their size
        torch.testing.assert_close(m.mean[n].double(), ref[n].mean(0), rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(m.fisher[n].double(), ref[n].square().mean(0), rtol=1e-4, atol=1e-9)
    fisher = ft.compute_fisher(model, batches, num_samples=12, params=names, engine=engine, progress=False)
    assert all(torch.equal(fisher[n], m.fisher[n]) for n in names)

    cons, snr = sc.consistency(m, z=1.65), sc.snr(m)
    for n in names:
        g = ref[n]
        se = g.std(0, unbiased=True) / math.sqrt(12)
        torch.testing.assert_close(cons[n], g.mean(0).abs() - 1.65 * se, rtol=1e-3, atol=1e-4 * float(g.abs().max()))
        f = g.square().mean(0)
        expect = torch.where(f > 0, g.mean(0).square() / f, torch.zeros_like(f))
        torch.testing.assert_close(snr[n], expect, rtol=1e-3, atol=1e-3)
        assert float(snr[n].min()) >= 0 and float(snr[n].max()) <= 1


def test_normalized_fisher_flattens_an_outer_product_and_keeps_the_excess():
    a, b = torch.tensor([1.0, 4.0, 0.5]), torch.tensor([2.0, 0.1, 3.0, 1.0])
    outer = torch.outer(a, b)
    flat = sc.normalized({"w": outer})["w"]
    torch.testing.assert_close(flat, torch.full_like(flat, float(flat[0, 0])), rtol=1e-12, atol=0)
    bumped = outer.clone()
    bumped[2, 1] *= 50  # an entry far above its row and column: the top of the normalised score
    norm = sc.normalized({"w": bumped, "v": torch.tensor([1.0, 2.0])})
    assert int(norm["w"].argmax()) == 2 * 4 + 1 and int(bumped.argmax()) != 2 * 4 + 1
    # brute force of the formula F_ij * mean(F) / (rowmean_i * colmean_j)
    f = bumped.double()
    for i in range(3):
        for j in range(4):
            expect = f[i, j] * f.mean() / (f[i].mean() * f[:, j].mean())
            assert math.isclose(float(norm["w"][i, j]), float(expect), rel_tol=1e-12)
    assert torch.equal(norm["v"], torch.tensor([1.0, 2.0], dtype=torch.float64))  # 1-D: unchanged
    assert torch.equal(sc.normalized({"z": torch.zeros(2, 3)})["z"], torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="score must be one of"):
        sc.score(None, "taylor")


def test_numpy_scores_select_the_same_mask():
    scores = _scores(3)
    as_numpy = {n: s.numpy() for n, s in scores.items()}
    for allocation in ("global", "uniform"):
        a = ft.select_mask(scores, budget=30, allocation=allocation)
        assert ft.select_mask(as_numpy, budget=30, allocation=allocation).fingerprint() == a.fingerprint()
