"""Ways around the optimizer wrappers that an outside audit found (session 5): each moved masked entries silently."""

from __future__ import annotations

import pytest
import torch

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert
from helpers import assert_only_kept_moved, snapshot


def model_and_mask(keep=0.1):
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters() if p.requires_grad}
    return model, ft.select_mask(scores, keep=keep, always_train="classifier")


def backward(model, seed=1):
    model(**cls_batches(1, seed=seed)[0]).loss.backward()


def split(model, mask):
    """(two candidates plus the head, the other candidates)"""
    named = dict(model.named_parameters())
    head = [p for n, p in named.items() if "classifier" in n and p.requires_grad]
    return [named[n] for n in mask.names[:2]] + head, [named[n] for n in mask.names[2:]]


class Flaky(torch.optim.SGD):
    """Moves every entry, then raises: a wrapped step that fails part-way (fails ``fails`` times)."""

    def __init__(self, params, fails=1):
        super().__init__(params, lr=0.1, momentum=0.9, weight_decay=0.1)
        self.fails = fails

    def step(self, closure=None):
        if self.fails:
            self.fails -= 1
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(1.0)
            raise RuntimeError("boom")
        return super().step(closure)


def test_sparse_adamw_refuses_a_group_added_later():
    model, mask = model_and_mask()
    first, rest = split(model, mask)
    opt = ft.SparseAdamW([{"params": first}], mask, model=model, lr=1e-2)
    with pytest.raises(NotImplementedError, match="constructor"):
        opt.add_param_group({"params": rest})


def test_sparse_adamw_refuses_tensors_appended_to_param_groups():
    model, mask = model_and_mask()
    first, rest = split(model, mask)
    opt = ft.SparseAdamW([{"params": first}], mask, model=model, lr=1e-2)
    opt.param_groups.append({**opt.param_groups[0], "params": rest})
    before = snapshot(model)
    backward(model)
    with pytest.raises(RuntimeError, match="no mask entry"):
        opt.step()
    assert_only_kept_moved(model, mask, before)


@pytest.mark.parametrize("how", ["add_param_group", "append"])
def test_masked_optimizer_refuses_groups_added_to_the_wrapped_optimizer(how):
    model, mask = model_and_mask()
    first, rest = split(model, mask)
    opt = ft.MaskedOptimizer(torch.optim.AdamW(first, lr=1e-2), mask, model)
    if how == "append":
        opt.param_groups.append({**opt.param_groups[0], "params": rest})
    else:
        opt.optimizer.add_param_group({"params": rest})
    before = snapshot(model)
    backward(model)
    with pytest.raises(RuntimeError, match="was not built with"):
        opt.step()
    assert_only_kept_moved(model, mask, before)
    with pytest.raises(RuntimeError, match="was not built with"):
        opt.optimizer.step()
    assert_only_kept_moved(model, mask, before)


def test_stepping_the_wrapped_optimizer_directly_keeps_masked_entries():
    model, mask = model_and_mask()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = ft.MaskedOptimizer(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), mask, model)
    before = snapshot(model)
    for seed in (1, 2):
        backward(model, seed)
        opt.optimizer.step()  # not through the wrapper: weight decay and momentum would move masked entries
        opt.zero_grad()
    assert assert_only_kept_moved(model, mask, before) > 0


def test_a_wrapped_step_that_raises_part_way_is_undone():
    model, mask = model_and_mask()
    opt = ft.MaskedOptimizer(Flaky([p for p in model.parameters() if p.requires_grad]), mask, model)
    before = snapshot(model)
    backward(model)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert assert_only_kept_moved(model, mask, before) > 0  # kept entries took the failed step, masked ones not
    opt.step()  # the retry trains normally
    assert_only_kept_moved(model, mask, before)


@pytest.mark.parametrize("then", ["retry", "close"])
def test_a_hooked_step_that_raises_is_undone_by_the_next_step_or_close(then):
    """The FishCallback path: the guard's step hooks sit on the optimizer itself, and torch runs no post-hook
    after a step that raised; the next step (or closing the guard) puts the masked entries back."""
    model, mask = model_and_mask()
    opt = Flaky([p for p in model.parameters() if p.requires_grad])
    guard = ft.MaskGuard(mask, model, [p for g in opt.param_groups for p in g["params"]]).attach(opt)
    before = snapshot(model)
    backward(model)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    if then == "retry":
        opt.step()
    guard.close()
    assert_only_kept_moved(model, mask, before)


@pytest.mark.parametrize("flag", [{"maximize": True}, {"amsgrad": True}, {"capturable": True},
                                  {"decoupled_weight_decay": False}, {"betas": (0.9, 1.0)}, {"lr": -1.0}])
def test_sparse_adamw_refuses_group_options_it_would_ignore(flag):
    model, mask = model_and_mask()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="SparseAdamW does not implement|must be"):
        ft.SparseAdamW([{"params": params, **flag}], mask, model=model)


def test_sparse_adamw_accepts_the_options_it_implements_per_group():
    model, mask = model_and_mask()
    first, rest = split(model, mask)
    opt = ft.SparseAdamW([{"params": first, "lr": 1e-2, "maximize": False, "foreach": True},
                          {"params": rest, "weight_decay": 0.0, "betas": (0.8, 0.99)}], mask, model=model)
    before = snapshot(model)
    backward(model)
    opt.step()
    assert assert_only_kept_moved(model, mask, before) > 0
