import copy

import numpy as np
import pytest
import torch
from scipy.linalg import fractional_matrix_power

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert
from fish_tuning.adafish import lora_factors, make_adafish


def factor_groups(B, A, *others):
    groups = [{"params": [B], "factor": "B"}, {"params": [A], "factor": "A"}]
    return groups + ([{"params": list(others)}] if others else [])


# -- convergence on a problem with a known optimum -----------------------------------------------------------


def test_low_rank_least_squares_reaches_eckart_young_optimum():
    """min_{B, A} 0.5 ||B A - T||^2 has optimum 0.5 * sum of the squared singular values of T beyond rank r."""
    torch.manual_seed(0)
    d, k, r, steps = 20, 15, 3, 300
    T = torch.randn(d, k)
    optimum = 0.5 * (torch.linalg.svdvals(T)[r:] ** 2).sum().item()
    B = torch.nn.Parameter(torch.randn(d, r) * 0.5)
    A = torch.nn.Parameter(torch.randn(r, k) * 0.5)
    opt = ft.AdaFish(factor_groups(B, A), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    first = None
    for _ in range(steps):
        loss = 0.5 * ((B @ A - T) ** 2).sum()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    final = 0.5 * ((B @ A - T) ** 2).sum().item()
    assert first > 2 * optimum
    assert final <= optimum * 1.001


# -- the update equals an independent reference of the documented rule ---------------------------------------


def reference_run(B0, A0, c0, grads, lr, b1, b2, damping, wd, exponent, scale, n_side, eps):
    """docs/adafish.md written out in float64 numpy, on rank-major factors; c (a bias) follows AdamW."""
    B, A, c = (x.double().numpy().copy() for x in (B0, A0, c0))
    r = B.shape[1]
    fac = {"B": dict(W=B.T.copy()), "A": dict(W=A)}  # rank-major [r, n]
    for st in fac.values():
        n = st["W"].shape[1]
        st.update(m=np.zeros((r, n)), v=np.zeros((r, n)), F=np.zeros((r, r)), d=np.zeros(n))
    mc, vc = np.zeros_like(c), np.zeros_like(c)
    for t, (gB, gA, gc) in enumerate(grads, start=1):
        for key, G in (("B", gB.double().numpy().T), ("A", gA.double().numpy())):
            st, n = fac[key], G.shape[1]
            st["m"] = b1 * st["m"] + (1 - b1) * G
            st["v"] = b2 * st["v"] + (1 - b2) * G**2
            mh, g = st["m"] / (1 - b1**t), G
            if n_side == "diag":
                st["d"] = b2 * st["d"] + (1 - b2) * (G**2).mean(0)
                w = 1 / (np.sqrt(st["d"] / (1 - b2**t)) + eps)
                g, mh = G * w, mh * w
            st["F"] = b2 * st["F"] + (1 - b2) * g @ g.T / n
            Fh = st["F"] / (1 - b2**t)
            if scale == "trace":
                Fh = Fh / (np.trace(Fh) / r)
            P = np.real(fractional_matrix_power(Fh + damping * np.trace(Fh) / r * np.eye(r), -exponent))
            s = P @ mh
            adam = st["m"] / (1 - b1**t) / (np.sqrt(st["v"] / (1 - b2**t)) + eps)
            if n_side == "graft":
                s = s * np.linalg.norm(adam, axis=0) / np.linalg.norm(s, axis=0)
            elif scale == "graft":
                s = s * np.linalg.norm(adam) / np.linalg.norm(s)
            st["W"] = st["W"] * (1 - lr * wd) - lr * s
        gc = gc.double().numpy()
        mc = b1 * mc + (1 - b1) * gc
        vc = b2 * vc + (1 - b2) * gc**2
        c = c * (1 - lr * wd) - lr * (mc / (1 - b1**t)) / (np.sqrt(vc / (1 - b2**t)) + eps)
    return fac["B"]["W"].T, fac["A"]["W"], c


@pytest.mark.parametrize("variant", sorted(ft.adafish.VARIANTS))
def test_update_matches_reference(variant):
    g = torch.Generator().manual_seed(3)
    out, r, inp = 7, 3, 5
    B = torch.nn.Parameter(torch.randn(out, r, generator=g))
    A = torch.nn.Parameter(torch.randn(r, inp, generator=g))
    c = torch.nn.Parameter(torch.randn(out, generator=g))
    start = [x.detach().clone() for x in (B, A, c)]
    hp = dict(lr=0.03, betas=(0.8, 0.95), damping=0.05, weight_decay=0.1, eps=1e-8)
    opt = ft.AdaFish(factor_groups(B, A, c), variant=variant, **hp)
    grads = [tuple(torch.randn(x.shape, generator=g) * s for x in (B, A, c)) for s in (1.0, 0.3, 2.0, 0.7)]
    for step_grads in grads:
        for p, gr in zip((B, A, c), step_grads):
            p.grad = gr.clone()
        opt.step()
    rule = ft.adafish.VARIANTS[variant]
    ref = reference_run(*start, grads, hp["lr"], *hp["betas"], hp["damping"], hp["weight_decay"], rule["exponent"],
                        rule["scale"], rule["n_side"], hp["eps"])
    for got, want in zip((B, A, c), ref):
        np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(B.detach(), start[0])


def first_step(variant, grad, **kw):
    """The step of an r=4 A factor [4, 50] for one gradient, per unit learning rate."""
    A = torch.nn.Parameter(torch.zeros_like(grad))
    opt = ft.AdaFish([{"params": [A], "factor": "A"}], lr=1.0, variant=variant, **kw)
    A.grad = grad.clone()
    opt.step()
    return -A.detach()


def test_default_step_is_scale_free_and_the_paper_step_is_not():
    """Learning rates transfer for the default: the step does not depend on the gradient's scale."""
    g = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for variant in ("fisher", "fisher_graft", "fisher_colgraft", "sqrt"):
        torch.testing.assert_close(first_step(variant, g * 1e-2), first_step(variant, g), rtol=1e-3, atol=1e-5)
    paper = first_step("paper", g).norm()
    assert first_step("paper", g * 1e-3).norm() > 500 * paper  # (F + d I)^-1 M scales as 1 / gradient
    adam_norm = torch.ones_like(g).norm()  # AdamW's first step is sign(g): norm sqrt(numel)
    torch.testing.assert_close(first_step("fisher_graft", g).norm(), adam_norm)
    torch.testing.assert_close(first_step("fisher_colgraft", g).norm(dim=0), torch.full((50,), 2.0))


def test_outlier_columns_do_not_dominate_the_default_step():
    """A few input features with 100x larger gradients (MiniLM's outlier dims): the n-side treatment keeps every
    column's step on AdamW's scale, while the untreated rules put almost the whole step there."""
    g = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    g[:, :3] *= 100.0

    def spread(step):
        cols = step.norm(dim=0)
        return (cols.max() / cols.median()).item()

    assert spread(first_step("fisher", g)) < 2.5 and spread(first_step("sqrt_diag", g)) < 2.5
    assert spread(first_step("fisher_colgraft", g)) == pytest.approx(1.0)
    assert spread(first_step("sqrt", g)) > 8  # the first version's default
    assert first_step("fisher", g).abs().max() < 5  # per entry: AdamW's first step is at most 1


def test_non_lora_parameters_follow_adamw_exactly():
    with pytest.warns(UserWarning, match="no trainable LoRA factors"):
        model = tiny_bert()
        opt = ft.AdaFish(model, lr=1e-2, weight_decay=0.1)
    twin = copy.deepcopy(model)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for batch in cls_batches(n_batches=3):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(**batch).loss.backward()
            o.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, msg=n)


# -- structure: factors from peft, r x r state ---------------------------------------------------------------


def test_factors_from_peft_and_r_by_r_state(bert_lora):
    kinds = lora_factors(bert_lora)
    assert kinds and all((".lora_A." in n) == (k == "A") and (".lora_B." in n) == (k == "B")
                         for n, k in kinds.items())
    opt = ft.AdaFish(bert_lora, lr=1e-3)
    bert_lora(**cls_batches(n_batches=1)[0]).loss.backward()
    opt.step()
    named = dict(bert_lora.named_parameters())
    for name, p in named.items():
        if not p.requires_grad:
            continue
        state = opt.state[p]
        if name in kinds:
            assert state["fisher"].shape == (4, 4), name  # r = 4 in conftest.lora
            assert "exp_avg_sq" not in state
            assert torch.allclose(state["fisher"], state["fisher"].T)
        else:
            assert "classifier" in name and state["exp_avg_sq"].shape == p.shape


def test_embedding_lora_factors_are_found():
    model = lora(tiny_bert(), targets=("word_embeddings", "query"))
    kinds = lora_factors(model)
    emb = {n: k for n, k in kinds.items() if "embedding" in n}
    assert sorted(emb.values()) == ["A", "B"]
    opt = ft.AdaFish(model)
    model(**cls_batches(n_batches=1)[0]).loss.backward()
    opt.step()
    named = dict(model.named_parameters())
    assert all(opt.state[named[n]]["fisher"].shape == (4, 4) for n in emb)


def test_dora_magnitude_falls_back_to_adamw():
    model = lora(tiny_bert(), use_dora=True)
    kinds = lora_factors(model)
    assert not any("magnitude" in n for n in kinds)
    opt = ft.AdaFish(model)
    model(**cls_batches(n_batches=1)[0]).loss.backward()
    opt.step()
    mags = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert mags and all(opt.state[p]["exp_avg_sq"].shape == p.shape for p in mags)


def test_per_sample_fisher_equals_the_sum_over_examples(bert_lora):
    """fisher='per_sample': F = (1 - b2) sum_i G_i G_i^T / n with G_i the gradient of example i's share of the loss."""
    batch = cls_batches(n_batches=1)[0]
    b = len(batch["labels"])
    bert_lora.eval()  # no dropout: single-example passes give the batch's per-example gradients
    twin = copy.deepcopy(bert_lora)
    kinds = lora_factors(bert_lora)
    want = {n: 0.0 for n in kinds}
    for i in range(b):
        twin.zero_grad()
        (twin(**{k: v[i:i + 1] for k, v in batch.items()}).loss / b).backward()
        for n, p in twin.named_parameters():
            if n in kinds:
                g = p.grad if kinds[n] == "A" else p.grad.T  # rank-major [r, n]
                want[n] = want[n] + g @ g.T / g.shape[1]
    b2 = 0.5
    opt = ft.AdaFish(bert_lora, lr=1e-3, betas=(0.9, b2), n_side="none", fisher="per_sample")
    bert_lora(**batch).loss.backward()
    opt.step()
    batch_stat = {}
    for n, p in bert_lora.named_parameters():
        if n in kinds:
            torch.testing.assert_close(opt.state[p]["fisher"], (1 - b2) * want[n], rtol=1e-3, atol=1e-9)
            g = p.grad if kinds[n] == "A" else p.grad.T
            batch_stat[n] = (1 - b2) * g @ g.T / g.shape[1]
    # the mini-batch statistic is a different matrix (rank <= 1 per column, no per-example spread)
    named = dict(bert_lora.named_parameters())
    assert all((opt.state[named[n]]["fisher"] - batch_stat[n]).norm() > 0.1 * batch_stat[n].norm() for n in kinds)


# -- composition with a FISH mask -----------------------------------------------------------------------------


def fish_mask(model, batches, keep=0.1):
    fisher = ft.compute_fisher(model, batches, num_samples=16, progress=False)
    return ft.select_mask(fisher, keep=keep, always_train="classifier")


@pytest.mark.parametrize("kw", [{}, {"variant": "fisher_colgraft"}, {"variant": "sqrt"}, {"fisher": "per_sample"}])
def test_masked_entries_bit_identical(bert_lora, kw):
    batches = cls_batches(n_batches=4)
    mask = fish_mask(bert_lora, batches)
    before = {n: p.detach().clone() for n, p in bert_lora.named_parameters()}
    opt = make_adafish(bert_lora, mask=mask, lr=1e-2, weight_decay=0.1, **kw)
    assert isinstance(opt, ft.MaskedOptimizer) and isinstance(opt.optimizer, ft.AdaFish)
    bert_lora.train()
    for step in range(5):
        bert_lora(**batches[step % len(batches)]).loss.backward()
        torch.nn.utils.clip_grad_norm_(bert_lora.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    after = dict(bert_lora.named_parameters())
    for name in mask.names:
        keep = mask.bool_mask(name)  # some factors keep no entry at all: then nothing may move
        new = after[name].detach()
        assert torch.equal(new[~keep], before[name][~keep]), name
        assert bool((new[keep] != before[name][keep]).all()), name
    head = "base_model.model.classifier.modules_to_save.default.weight"
    assert not torch.equal(after[head].detach(), before[head])


def test_without_restore_the_r_by_r_mixing_moves_masked_entries(bert_lora):
    """Guards the test above: zeroing masked gradients alone is not enough, P M spreads the update along r."""
    batches = cls_batches(n_batches=2)
    mask = fish_mask(bert_lora, batches)
    named = dict(bert_lora.named_parameters())
    # an A factor with kept and masked entries in one column: P mixes the r rows of each column
    name = next(n for n in mask.names if ".lora_A." in n and bool((mask.bool_mask(n).sum(0) % 4 != 0).any()))
    keep = mask.bool_mask(name)
    before = named[name].detach().clone()
    opt = ft.AdaFish(bert_lora, lr=1e-2)
    bert_lora(**batches[0]).loss.backward()
    for n in mask.names:
        named[n].grad.mul_(mask.bool_mask(n))
    opt.step()
    assert not torch.equal(named[name].detach()[~keep], before[~keep])


def test_masked_gradients_stay_out_of_the_fisher_statistics(bert_lora):
    batches = cls_batches(n_batches=2)
    mask = fish_mask(bert_lora, batches, keep=0.05)
    bert_lora.eval()  # no dropout: the twin's gradients must be those the optimizer sees
    twin = copy.deepcopy(bert_lora)  # no hooks: gives the unmasked gradients
    twin(**batches[0]).loss.backward()
    full = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
    b2 = 0.9
    opt = ft.MaskedOptimizer(ft.AdaFish(bert_lora, lr=1e-3, betas=(0.5, b2), n_side="none"), mask, bert_lora)
    bert_lora(**batches[0]).loss.backward()
    opt.step()
    named = dict(bert_lora.named_parameters())
    for name, kind in lora_factors(bert_lora).items():
        g = full[name] * mask.bool_mask(name)
        gr = g if kind == "A" else g.T  # rank-major [r, n]
        want = (1 - b2) * gr @ gr.T / gr.shape[1]
        got = opt.state[named[name]]["fisher"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0.0)
        unmasked = full[name] if kind == "A" else full[name].T
        polluted = (1 - b2) * unmasked @ unmasked.T / gr.shape[1]
        assert (got - polluted).abs().max() > 1e-3 * polluted.abs().max(), name


# -- state_dict, Trainer, arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fisher", "fisher_colgraft"])
def test_state_dict_round_trip_continues_identically(bert_lora, variant):
    batches = cls_batches(n_batches=2)
    opt = ft.AdaFish(bert_lora, lr=1e-2, weight_decay=0.01, variant=variant)
    for step in range(3):
        opt.zero_grad()
        bert_lora(**batches[step % 2]).loss.backward()
        opt.step()
    twin = copy.deepcopy(bert_lora)
    fresh = ft.AdaFish(twin, lr=5.0, variant="sqrt")
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [g["factor"] for g in fresh.param_groups] == ["A", "B", None]
    assert fresh.param_groups[0]["lr"] == 1e-2 and fresh.param_groups[0]["scale"] == opt.param_groups[0]["scale"]
    for m, o in ((bert_lora, opt), (twin, fresh)):
        o.zero_grad()
        m(**batches[0]).loss.backward()
        o.step()
    for (n, p), q in zip(bert_lora.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


def test_first_version_checkpoint_keeps_its_rule(bert_lora):
    """A state dict saved by the first version (no scale / n_side / fisher keys) continues as variant 'sqrt'."""
    batches = cls_batches(n_batches=2)
    opt = ft.AdaFish(bert_lora, lr=1e-2, variant="sqrt")
    bert_lora(**batches[0]).loss.backward()
    opt.step()
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in ("scale", "n_side", "fisher"):
            del group[key]
    twin = copy.deepcopy(bert_lora)
    fresh = ft.AdaFish(twin, lr=1e-2)  # the new default rule ...
    fresh.load_state_dict(old)  # ... replaced by the checkpoint's
    for m, o in ((bert_lora, opt), (twin, fresh)):
        o.zero_grad()
        m(**batches[1]).loss.backward()
        o.step()
    for (n, p), q in zip(bert_lora.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


def test_hf_trainer_with_masked_adafish(bert_lora, tmp_path):
    from transformers import Trainer, TrainingArguments

    batches = cls_batches(n_batches=2)
    mask = fish_mask(bert_lora, batches)
    before = {n: p.detach().clone() for n, p in bert_lora.named_parameters()}
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, learning_rate=1e-2, logging_strategy="no")
    opt = make_adafish(bert_lora, mask=mask, lr=1e-2)
    Trainer(model=bert_lora, args=args, train_dataset=rows, optimizers=(opt, None)).train()
    factor = next(p for n, p in bert_lora.named_parameters() if n in lora_factors(bert_lora))
    assert opt.state[factor]["step"] == 3
    moved = 0
    for name, p in bert_lora.named_parameters():
        if name in mask.names:
            keep = mask.bool_mask(name)
            assert torch.equal(p.detach()[~keep], before[name][~keep]), name
            moved += int((p.detach()[keep] != before[name][keep]).sum())
    assert moved == mask.num_selected


@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1e-3), "lr must be >= 0"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(betas=(-0.1, 0.99)), "betas"),
    (dict(damping=0.0), "damping must be > 0"),
    (dict(damping=-1e-3), "damping must be > 0"),
    (dict(exponent=0.0), "exponent"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(variant="newton"), "variant must be one of"),
    (dict(scale="norm"), "scale must be one of"),
    (dict(n_side="full"), "n_side must be one of"),
    (dict(fisher="exact"), "fisher must be one of"),
    (dict(fisher="per_sample", variant="paper"), "needs scale 'trace' or 'graft'"),
])
def test_bad_arguments(bert_lora, kw, match):
    with pytest.raises(ValueError, match=match):
        ft.AdaFish(bert_lora, **kw)


def test_bad_param_groups():
    with pytest.raises(ValueError, match="'A', 'B' or None"):
        ft.AdaFish([{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "factor": "C"}])
    with pytest.raises(ValueError, match="at least 2 dims"):
        ft.AdaFish([{"params": [torch.nn.Parameter(torch.zeros(3))], "factor": "A"}])
    with pytest.raises(ValueError, match="damping"):
        ft.AdaFish([{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "factor": "A", "damping": 0}])
    with pytest.raises(ValueError, match="needs the model"):
        ft.AdaFish([{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "factor": "A"}], fisher="per_sample")
