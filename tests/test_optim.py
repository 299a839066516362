import pytest
import torch

import fish_tuning as ft
from conftest import cls_batches, lm_batches
from helpers import assert_only_kept_moved, snapshot


def masked_setup(model, batches, keep=0.1):
    fisher = ft.compute_fisher(model, batches, num_samples=16, progress=False)
    mask = ft.select_mask(fisher, keep=keep, always_train="classifier")
    return mask


def train(model, mask, batches, steps=20, accum=2, clip=1.0, autocast=True, lr=1e-2, wd=0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = ft.MaskedOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=wd), mask, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * steps))
    model.train()
    for step in range(steps):
        for micro in range(accum):
            batch = dict(batches[(step * accum + micro) % len(batches)])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad()
    return opt


def check_frozen_and_moved(model, mask, before):
    after = dict(model.named_parameters())
    assert assert_only_kept_moved(model, mask, before) == mask.num_selected, "a selected entry did not move"
    for name in mask.always_train:
        assert not torch.equal(after[name].detach(), before[name])


def test_masked_entries_bit_identical_after_20_adamw_steps(bert_lora):
    batches = cls_batches(n_batches=4)
    mask = masked_setup(bert_lora, batches)
    before = snapshot(bert_lora)
    train(bert_lora, mask, batches)
    check_frozen_and_moved(bert_lora, mask, before)


def test_causal_lm_masked_training(llama_lora):
    batches = lm_batches(n_batches=4)
    mask = masked_setup(llama_lora, batches)
    before = snapshot(llama_lora)
    train(llama_lora, mask, batches, steps=10)
    check_frozen_and_moved(llama_lora, mask, before)


def test_plain_adamw_would_move_masked_entries(bert_lora):
    """Guards the test above: zeroing gradients alone does not freeze entries under AdamW weight decay."""
    batches = cls_batches(n_batches=2)
    mask = masked_setup(bert_lora, batches)
    before = snapshot(bert_lora)
    params = [p for p in bert_lora.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    named = dict(bert_lora.named_parameters())
    loss = bert_lora(**batches[0]).loss
    loss.backward()
    for n in mask.names:
        named[n].grad.mul_(mask.bool_mask(n))
    opt.step()
    n = mask.names[0]
    keep = mask.bool_mask(n)
    assert not torch.equal(named[n].detach()[~keep], before[n][~keep])


def test_masked_gradients_seen_by_clipping(bert_lora):
    batches = cls_batches(n_batches=1)
    mask = masked_setup(bert_lora, batches)
    params = [p for p in bert_lora.parameters() if p.requires_grad]
    opt = ft.MaskedOptimizer(torch.optim.SGD(params, lr=0.1), mask, bert_lora)  # noqa: F841 (hooks live with it)
    bert_lora(**batches[0]).loss.backward()
    named = dict(bert_lora.named_parameters())
    for n in mask.names:
        assert not named[n].grad[~mask.bool_mask(n)].any()


def test_state_dict_round_trip_and_scheduler(bert_lora):
    batches = cls_batches(n_batches=2)
    mask = masked_setup(bert_lora, batches)
    opt = train(bert_lora, mask, batches, steps=3, autocast=False)
    state = opt.state_dict()
    assert opt.param_groups[0]["lr"] < 1e-2  # the LambdaLR scheduler drove the wrapped optimizer
    params = [p for p in bert_lora.parameters() if p.requires_grad]
    opt.close()
    fresh = ft.MaskedOptimizer(torch.optim.AdamW(params, lr=1e-2), mask, bert_lora)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["state"].keys() == state["state"].keys()
    first = next(iter(state["state"]))
    assert torch.equal(fresh.state_dict()["state"][first]["exp_avg"], state["state"][first]["exp_avg"])


def test_unknown_trainable_parameter_is_an_error(bert_lora):
    batches = cls_batches(n_batches=1)
    fisher = ft.compute_fisher(bert_lora, batches, num_samples=8, params=ft.peft_candidates(bert_lora),
                               progress=False)
    mask = ft.select_mask(fisher, keep=0.1)  # classifier neither candidate nor always_train
    params = [p for p in bert_lora.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="classifier.*always_train"):
        ft.MaskedOptimizer(torch.optim.AdamW(params), mask, bert_lora)


def test_state_bytes_counts_state_backup_masks_and_indices(bert_lora):
    batches = cls_batches(n_batches=2)
    mask = masked_setup(bert_lora, batches)
    opt = train(bert_lora, mask, batches, steps=2, autocast=False)
    named = dict(bert_lora.named_parameters())
    cand = sum(named[n].numel() for n in mask.names)
    inner = sum(t.numel() * t.element_size() for s in opt.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    kept_index_bytes = sum(opt._guard.kept(named[n]).element_size() * len(mask.indices[n]) for n in mask.names)
    assert opt.state_bytes() == inner + cand * 4 + cand * 1 + kept_index_bytes  # backup fp32 + bool mask + indices
