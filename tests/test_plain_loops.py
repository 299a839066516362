"""The README's plain-loop recipes: MaskGuard on an optimizer you keep, and MaskedOptimizer under accelerate."""

import torch
from accelerate import Accelerator

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert
from helpers import assert_only_kept_moved


def setup():
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    loader = ft.calibration_loader([{k: v[i] for k, v in b.items()} for b in cls_batches(2) for i in range(8)],
                                   num_samples=16, batch_size=4)
    mask = ft.select_mask(ft.compute_fisher(model, loader, num_samples=16, progress=False), keep=0.1,
                          always_train="classifier")
    return model, loader, mask


def assert_masked(model, mask, before):
    assert assert_only_kept_moved(model, mask, before) > 0.9 * mask.num_selected


def test_mask_guard_attached_to_own_optimizer_then_removed():
    model, loader, mask = setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    guard = ft.MaskGuard(mask, model, [p for g in opt.param_groups for p in g["params"]]).attach(opt)
    model.train()
    for _ in range(2):
        for batch in loader:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    assert_masked(model, mask, before)
    guard.close()  # afterwards the same optimizer moves masked entries again (weight decay at least)
    name = mask.names[0]
    frozen_before = dict(model.named_parameters())[name].detach().clone()
    model(**next(iter(loader))).loss.backward()
    opt.step()
    assert not torch.equal(dict(model.named_parameters())[name].detach()[~mask.bool_mask(name)],
                           frozen_before[~mask.bool_mask(name)])


def test_masked_optimizer_through_accelerate_prepare():
    model, loader, mask = setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = ft.MaskedOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                               weight_decay=0.1), mask, model)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    pmodel, popt, ploader = accelerator.prepare(model, opt, loader)
    pmodel.train()
    for _ in range(2):
        for batch in ploader:
            with accelerator.accumulate(pmodel):
                accelerator.backward(pmodel(**batch).loss)
                accelerator.clip_grad_norm_(pmodel.parameters(), 1.0)
                popt.step()
                popt.zero_grad()
    assert_masked(model, mask, before)
