import pytest
import torch

import fish_tuning as ft
from conftest import cls_batches, lm_batches, lora, tiny_bert, tiny_llama
from fish_tuning.fisher import per_sample_log_likelihood
from fish_tuning.methods.peft import check_lora_init


def brute_force(model, batches, names):
    """Reference: one batch-size-1 backward per sample, squared, averaged."""
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in names}
    count = 0
    model.eval()
    for batch in batches:
        for i in range(batch["labels"].shape[0]):
            row = {k: v[i: i + 1] for k, v in batch.items()}
            labels = row.pop("labels")
            loss = -per_sample_log_likelihood(model(**row).logits, labels).sum()
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            for n, g in zip(names, grads):
                sums[n] += g.square()
            count += 1
    return {n: s / count for n, s in sums.items()}


def assert_close(got, ref, rtol=1e-4):
    for n in ref:
        denom = ref[n].abs().max().clamp_min(1e-30)
        err = float((got[n] - ref[n]).abs().max() / denom)
        assert err <= rtol, f"{n}: relative error {err:.2e}"


@pytest.mark.parametrize("engine", ["vectorized", "loop"])
def test_classifier_fisher_matches_brute_force(bert_lora, engine):
    batches = cls_batches(n_batches=2, batch_size=8)
    names = ft.peft_candidates(bert_lora)
    got = ft.compute_fisher(bert_lora, batches, num_samples=16, params=names, engine=engine, progress=False)
    assert_close(got, brute_force(bert_lora, batches, names))


@pytest.mark.parametrize("engine", ["vectorized", "loop"])
def test_causal_lm_fisher_with_ignored_labels_matches_brute_force(llama_lora, engine):
    batches = lm_batches(n_batches=2, batch_size=8)
    names = ft.peft_candidates(llama_lora)
    got = ft.compute_fisher(llama_lora, batches, num_samples=16, params=names, engine=engine, progress=False)
    assert_close(got, brute_force(llama_lora, batches, names))


def test_regression_head_fisher_matches_brute_force():
    model = lora(tiny_bert(num_labels=1))
    batches = cls_batches(num_labels=1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # includes the modules_to_save head
    got = ft.compute_fisher(model, batches, num_samples=16, progress=False)
    assert set(got) == set(names)
    assert_close(got, brute_force(model, batches, names))


def test_per_sample_is_not_squared_batch_mean(bert_lora):
    batches = cls_batches(n_batches=1, batch_size=8)
    names = ft.peft_candidates(bert_lora)
    fisher = ft.compute_fisher(bert_lora, batches, num_samples=8, params=names, progress=False)
    params = dict(bert_lora.named_parameters())
    b = dict(batches[0])
    labels = b.pop("labels")
    loss = -per_sample_log_likelihood(bert_lora(**b).logits, labels).mean()
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    wrong = {n: g.square() for n, g in zip(names, grads)}
    assert any(not torch.allclose(fisher[n], wrong[n], rtol=1e-2) for n in names)


def test_dora_falls_back_to_exact_loop():
    model = lora(tiny_bert(), use_dora=True)
    batches = cls_batches(n_batches=1, batch_size=6)
    names = ft.peft_candidates(model)
    assert any("lora_magnitude_vector" in n for n in names)
    got = ft.compute_fisher(model, batches, num_samples=6, params=names, progress=False)  # auto
    assert_close(got, brute_force(model, batches, names))


def test_num_samples_truncates_batches(bert_lora):
    batches = cls_batches(n_batches=3, batch_size=8)
    names = ft.peft_candidates(bert_lora)
    got = ft.compute_fisher(bert_lora, batches, num_samples=5, params=names, progress=False)
    ref = brute_force(bert_lora, [{k: v[:5] for k, v in batches[0].items()}], names)
    assert_close(got, ref)


def test_restores_mode_grads_and_requires_grad(bert_lora):
    bert_lora.train()
    flags = {n: p.requires_grad for n, p in bert_lora.named_parameters()}
    ft.compute_fisher(bert_lora, cls_batches(), num_samples=8, progress=False)
    assert bert_lora.training
    assert all(p.grad is None for p in bert_lora.parameters())
    assert flags == {n: p.requires_grad for n, p in bert_lora.named_parameters()}


def test_expected_fisher_is_seeded_and_differs_from_empirical():
    # 3 classes: with 2 near-uniform classes (y - p)^2 is ~0.25 for either label and the two kinds coincide.
    model = lora(tiny_bert(num_labels=3))
    batches = cls_batches(n_batches=1, batch_size=8, num_labels=3)
    names = ft.peft_candidates(model)
    a = ft.compute_fisher(model, batches, num_samples=8, kind="expected", params=names, seed=3, progress=False)
    b = ft.compute_fisher(model, batches, num_samples=8, kind="expected", params=names, seed=3, progress=False)
    c = ft.compute_fisher(model, batches, num_samples=8, kind="expected", params=names, seed=4, progress=False)
    e = ft.compute_fisher(model, batches, num_samples=8, kind="empirical", params=names, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert any(not torch.allclose(a[n], e[n], rtol=1e-3) for n in names)
    assert any(not torch.allclose(a[n], c[n], rtol=1e-3) for n in names)


def test_expected_causal_lm_labels_keep_ignored_positions():
    from fish_tuning.fisher import sample_labels

    labels = lm_batches(n_batches=1)[0]["labels"]
    drawn = sample_labels(torch.randn(*labels.shape, 64), labels, torch.Generator().manual_seed(0))
    assert torch.equal(drawn == -100, labels == -100)
    assert not torch.equal(drawn, labels)


def test_zero_fisher_warning_for_default_lora_init_not_pissa():
    default = lora(tiny_bert(), init=True)
    with pytest.warns(ft.ZeroFisherWarning, match="pissa"):
        scores = ft.compute_fisher(default, cls_batches(), num_samples=8, params=ft.peft_candidates(default),
                                   progress=False)
    assert all(not scores[n].any() for n in scores if "lora_A" in n)
    pissa = lora(tiny_bert(), init="pissa")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.ZeroFisherWarning)
        scores = ft.compute_fisher(pissa, cls_batches(), num_samples=8, params=ft.peft_candidates(pissa),
                                   progress=False)
    assert all(scores[n].any() for n in scores)


def test_check_lora_init_warns_on_zero_b():
    with pytest.warns(UserWarning, match="pissa"):
        assert check_lora_init(lora(tiny_bert(), init=True))


@pytest.mark.parametrize(
    "kwargs, batches, match",
    [
        ({"num_samples": 0}, cls_batches(), "num_samples"),
        ({"num_samples": -3}, cls_batches(), "num_samples"),
        ({}, [], "no batches"),
        ({}, [{"input_ids": torch.ones(2, 3, dtype=torch.long)}], "labels"),
        ({"params": ["nope"]}, cls_batches(), "nope"),
        ({"kind": "true"}, cls_batches(), "kind"),
    ],
)
def test_bad_input_messages(bert_lora, kwargs, batches, match):
    with pytest.raises(ValueError, match=match):
        ft.compute_fisher(bert_lora, batches, progress=False, **kwargs)


def test_no_candidates_message():
    model = tiny_bert()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no candidate parameters"):
        ft.compute_fisher(model, cls_batches(), progress=False)


def test_nan_gradient_names_parameter(bert_lora):
    name = ft.peft_candidates(bert_lora)[0]
    with torch.no_grad():
        dict(bert_lora.named_parameters())[name].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="lora"):
        ft.compute_fisher(bert_lora, cls_batches(), num_samples=8, progress=False)


def test_llama_tiny_builds():  # guards the fixture itself: LoRA on a causal LM has candidates in both factors
    names = ft.peft_candidates(lora(tiny_llama(), targets=("q_proj",), task="CAUSAL_LM"))
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
