import copy
import io

import pytest
import torch

import fish_tuning as ft
from conftest import cls_batches, lm_batches, lora, tiny_bert, tiny_llama


def make_mask(model, batches, keep=0.1):
    fisher = ft.compute_fisher(model, batches, num_samples=16, progress=False)
    return ft.select_mask(fisher, keep=keep, always_train="classifier")


def run_steps(model, opt, batches, steps, sched=None, clip=1.0, start=0):
    model.eval()  # no dropout: two runs must see the same forward
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(start, start + steps):
        model(**dict(batches[step % len(batches)])).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        yield step


def assert_params_close(a, b):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_matches_masked_adamw_step_by_step(which):
    if which == "bert":
        base, batches = lora(tiny_bert()), cls_batches(n_batches=4)
    else:
        base, batches = lora(tiny_llama(), targets=("q_proj", "v_proj"), task="CAUSAL_LM"), lm_batches(n_batches=4)
    mask = make_mask(base, batches)
    ref_model, sparse_model = copy.deepcopy(base), copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    ref = ft.make_optimizer(ref_model, mask, lr=1e-2, weight_decay=0.1, sparse=False)
    sparse = ft.make_optimizer(sparse_model, mask, lr=1e-2, weight_decay=0.1)
    assert isinstance(ref, ft.MaskedOptimizer) and isinstance(sparse, ft.SparseAdamW)
    decay = lambda s: 1.0 - s / 20  # noqa: E731  (an LR schedule that changes every step)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, decay)
    sparse_sched = torch.optim.lr_scheduler.LambdaLR(sparse, decay)
    for _ in zip(run_steps(ref_model, ref, batches, 8, ref_sched), run_steps(sparse_model, sparse, batches, 8,
                                                                               sparse_sched)):
        assert_params_close(ref_model, sparse_model)
    assert sparse.param_groups[0]["lr"] == pytest.approx(1e-2 * (1 - 8 / 20))
    named, ref_named = dict(sparse_model.named_parameters()), dict(ref_model.named_parameters())
    ref_state = {id(p): s for p, s in ref.state.items()}
    for name in mask.names:
        keep = mask.bool_mask(name)
        new = named[name].detach()
        assert torch.equal(new[~keep], before[name][~keep]), f"masked entries of {name} changed"
        assert bool((new[keep] != before[name][keep]).all()), f"a kept entry of {name} did not move"
        state = sparse.state[named[name]]
        assert state["exp_avg"].shape == (mask.indices[name].numel(),)
        dense = ref_state[id(ref_named[name])]
        torch.testing.assert_close(state["exp_avg_sq"], dense["exp_avg_sq"].reshape(-1)[mask.indices[name]],
                                   rtol=1e-4, atol=1e-12)
    for name in mask.always_train:  # dense AdamW for the head
        assert sparse.state[named[name]]["exp_avg"].shape == named[name].shape
        assert not torch.equal(named[name].detach(), before[name])


def test_state_dict_round_trip_resumes_identically(bert_lora):
    batches = cls_batches(n_batches=3)
    mask = make_mask(bert_lora, batches)
    opt = ft.SparseAdamW(bert_lora, mask, lr=1e-2, weight_decay=0.1)
    list(run_steps(bert_lora, opt, batches, 3))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed_model = copy.deepcopy(bert_lora)
    resumed = ft.SparseAdamW(resumed_model, mask, lr=5.0, weight_decay=0.0)  # hyperparameters come from the file
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    assert resumed.param_groups[0]["lr"] == 1e-2 and resumed.param_groups[0]["weight_decay"] == 0.1
    list(run_steps(bert_lora, opt, batches, 2, start=3))
    list(run_steps(resumed_model, resumed, batches, 2, start=3))
    for (n, p), (_, q) in zip(bert_lora.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(p, q), n


def test_load_state_dict_from_another_mask_is_an_error(bert_lora):
    batches = cls_batches(n_batches=2)
    opt = ft.SparseAdamW(bert_lora, make_mask(bert_lora, batches, keep=0.1), lr=1e-2)
    list(run_steps(bert_lora, opt, batches, 1))
    state = opt.state_dict()
    opt.close()  # one guard per tensor: the first optimizer's hooks go before the second attaches
    other = ft.SparseAdamW(bert_lora, make_mask(bert_lora, batches, keep=0.3), lr=1e-2)
    with pytest.raises(ValueError, match="another mask"):
        other.load_state_dict(state)


def test_state_bytes_scale_with_kept_entries(bert_lora):
    batches = cls_batches(n_batches=2)
    mask = make_mask(bert_lora, batches, keep=0.1)
    opt = ft.SparseAdamW(bert_lora, mask, lr=1e-2)
    list(run_steps(bert_lora, opt, batches, 1))
    named = dict(bert_lora.named_parameters())
    assert all(opt.local_mask.entries[named[n]].index.dtype == torch.int32 for n in mask.names)
    cand = sum(named[n].numel() for n in mask.names)
    head = sum(named[n].numel() for n in mask.always_train)
    k = mask.num_selected
    assert opt.state_bytes() == k * (4 + 4 + 4) + head * 8 + 4 * (len(mask.names) + len(mask.always_train))
    candidate_bytes = opt.state_bytes() - head * 8 - 4 * (len(mask.names) + len(mask.always_train))
    assert candidate_bytes / (cand * 8) < 0.2  # 12 bytes per kept entry vs 8 per entry for dense AdamW


def test_masked_gradients_zero_after_backward(bert_lora):
    batches = cls_batches(n_batches=1)
    mask = make_mask(bert_lora, batches)
    bert_lora.eval()
    plain = copy.deepcopy(bert_lora)
    opt = ft.SparseAdamW(bert_lora, mask)  # the hooks live as long as the optimizer  # noqa: F841
    bert_lora(**batches[0]).loss.backward()
    plain(**batches[0]).loss.backward()
    named, ref = dict(bert_lora.named_parameters()), dict(plain.named_parameters())
    for n in mask.names:
        keep = mask.bool_mask(n)
        assert not named[n].grad[~keep].any()
        assert torch.equal(named[n].grad[keep], ref[n].grad[keep])


def test_unknown_trainable_parameter_is_an_error(bert_lora):
    batches = cls_batches(n_batches=1)
    fisher = ft.compute_fisher(bert_lora, batches, num_samples=8, params=ft.peft_candidates(bert_lora),
                               progress=False)
    with pytest.raises(ValueError, match="classifier.*always_train"):
        ft.SparseAdamW(bert_lora, ft.select_mask(fisher, keep=0.1))


def test_tensors_without_gradient_skip_a_step_like_adamw(bert_lora):
    """A tensor whose grad is None keeps its step count (bias correction differs per tensor afterwards)."""
    batches = cls_batches(n_batches=2)
    mask = make_mask(bert_lora, batches)
    ref_model, sparse_model = copy.deepcopy(bert_lora.eval()), copy.deepcopy(bert_lora)  # eval: no dropout
    ref = ft.make_optimizer(ref_model, mask, lr=1e-2, weight_decay=0.1, sparse=False)
    sparse = ft.make_optimizer(sparse_model, mask, lr=1e-2, weight_decay=0.1)
    skipped = mask.names[0]
    for step in range(4):
        for model, opt in ((ref_model, ref), (sparse_model, sparse)):
            model(**dict(batches[step % 2])).loss.backward()
            if step == 1:
                dict(model.named_parameters())[skipped].grad = None
            opt.step()
            opt.zero_grad()
        assert_params_close(ref_model, sparse_model)
    named = dict(sparse_model.named_parameters())
    assert float(sparse.state[named[skipped]]["step"]) == 3 and float(sparse.state[named[mask.names[1]]]["step"]) == 4


def test_param_groups_decay_and_no_decay_match_masked_adamw():
    base = lora(tiny_bert(), modules_to_save=["classifier"])
    batches = cls_batches(n_batches=3)
    fisher = ft.compute_fisher(base, batches, num_samples=16, params=ft.peft_candidates(base), progress=False)
    mask = ft.select_mask(fisher, keep=0.2, always_train="classifier")
    ref_model, sparse_model = copy.deepcopy(base), copy.deepcopy(base)

    def groups(model):  # nanoGPT-style: no decay on 1-d tensors, a higher lr for the head
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in named if p.dim() >= 2 and "classifier" not in n], "weight_decay": 0.1},
                {"params": [p for n, p in named if p.dim() < 2 and "classifier" not in n], "weight_decay": 0.0},
                {"params": [p for n, p in named if "classifier" in n], "weight_decay": 0.0, "lr": 3e-2}]

    ref = ft.MaskedOptimizer(torch.optim.AdamW(groups(ref_model), lr=1e-2), mask, ref_model)
    sparse = ft.SparseAdamW(groups(sparse_model), mask, lr=1e-2, model=sparse_model)
    assert [g["weight_decay"] for g in sparse.param_groups] == [0.1, 0.0, 0.0]
    assert sparse.param_groups[2]["lr"] == 3e-2
    for _ in zip(run_steps(ref_model, ref, batches, 4), run_steps(sparse_model, sparse, batches, 4)):
        assert_params_close(ref_model, sparse_model)
    with pytest.raises(TypeError, match="model=model"):
        ft.SparseAdamW(groups(sparse_model), mask)
