"""Inputs the Python API takes as a user would give them (issue 27): plain-list labels and return_dict=False in
compute_fisher, a one-element tensor lr in SparseAdamW, and a PeftModel passed to load_adapter."""

from __future__ import annotations

import pytest
import torch

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert


def test_compute_fisher_takes_list_labels_and_return_dict_false():
    model = lora(tiny_bert())
    batches = cls_batches(2, 4)
    want = ft.compute_fisher(model, batches, num_samples=8, progress=False)
    as_lists = [{**b, "labels": b["labels"].tolist()} for b in batches]
    got = ft.compute_fisher(model, as_lists, num_samples=8, progress=False)
    assert all(torch.equal(want[n], got[n]) for n in want)
    model.config.return_dict = False  # the model then returns tuples, logits first
    tuples = ft.compute_fisher(model, batches, num_samples=8, progress=False)
    assert all(torch.equal(want[n], tuples[n]) for n in want)


def _masked():
    model = lora(tiny_bert())
    scores = {n: torch.rand(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    return model, ft.select_mask(scores, keep=0.1, always_train="classifier")


def test_sparse_adamw_takes_a_tensor_lr():
    results = []
    for lr in (1e-2, torch.tensor(1e-2)):
        model, mask = _masked()
        opt = ft.SparseAdamW(model, mask, lr=lr)
        model(**cls_batches(1, 4)[0]).loss.backward()
        opt.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    model, mask = _masked()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": torch.tensor(1e-2)}]
    assert ft.SparseAdamW(groups, mask, model=model).param_groups[0]["lr"] == pytest.approx(1e-2)


def test_load_adapter_on_a_peft_model_names_the_fix(tmp_path):
    model, mask = _masked()
    ft.save_adapter(model, mask, tmp_path)
    with pytest.raises(TypeError, match="load_adapter takes the base model, not a PeftModel"):
        ft.load_adapter(lora(tiny_bert()), tmp_path)
    loaded, got = ft.load_adapter(tiny_bert(), tmp_path)
    assert got.fingerprint() == mask.fingerprint()
