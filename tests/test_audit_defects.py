"""Regression tests for the bad-input audit (issue 10, items 4-7 and 9-12, and the late / raw errors of section 3)."""

import dataclasses
import os

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import fish_tuning as ft
from conftest import cls_batches, lm_batches, lora, tiny_bert, tiny_llama
from fish_tuning.methods.peft import check_lora_init
from helpers import snapshot


# ----------------------------------------------------------------------------- 4: rows that are not samples
class FlatTokens(nn.Module):
    """Hidden states flattened to [B*T, H] before a Linear (as MoE experts and packed-sequence models do)."""

    def __init__(self, rows_of_first_sample: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.rows_of_first_sample = rows_of_first_sample

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        h = self.emb(input_ids).reshape(b * t, -1)
        if self.rows_of_first_sample:  # leading dim B, but every row belongs to sample 0
            h = h[:b]
            return SequenceClassifierOutput(logits=self.head(torch.tanh(self.proj(h))))
        h = torch.tanh(self.proj(h)).reshape(b, t, -1).mean(1)
        return SequenceClassifierOutput(logits=self.head(h))


@pytest.mark.parametrize("rows_of_first_sample", [False, True])
def test_vectorised_fisher_checks_rows_are_samples(rows_of_first_sample):
    """Audit item 4: engine='auto' vs 'loop' differed by 0.63 (relative) with [B*T, H] inputs."""
    model = FlatTokens(rows_of_first_sample)
    batches = cls_batches(2, batch_size=8)
    params = ["proj.weight", "proj.bias"]
    auto = ft.compute_fisher(model, batches, num_samples=16, params=params, progress=False)
    loop = ft.compute_fisher(model, batches, num_samples=16, params=params, engine="loop", progress=False)
    for n in params:
        torch.testing.assert_close(auto[n], loop[n], rtol=1e-4, atol=1e-9)
    with pytest.raises(RuntimeError, match="not exact"):
        ft.compute_fisher(model, batches, num_samples=16, params=params, engine="vectorized", progress=False)


# ----------------------------------------------------------------------------- 5: embedding LoRA
class BatchCoupled(nn.Module):
    """A candidate Linear followed by an eval-mode coupling between samples (a stand-in for batch-statistics norms
    or batch-global routing): right in the batch sum, wrong per sample."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.lora = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 3).requires_grad_(False)

    def forward(self, x, labels=None):
        h = self.scale * self.lora(x)
        return SequenceClassifierOutput(logits=self.head(torch.tanh(x + h + 0.5 * h.mean(0, keepdim=True))))


@pytest.mark.parametrize("scale, duplicate", [(1.0, True), (1e-5, False)])
def test_probe_is_not_blinded_by_identical_samples_or_small_gradients(scale, duplicate):
    # duplicates happen in real data, and per-sample gradients of 1e-6 in deep or near-zero factors: neither may
    # hide a coupling between samples (the checks are relative to the candidate's own scale, no absolute floor)
    torch.manual_seed(0)
    model = BatchCoupled(scale)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    if duplicate:
        x[1], y[1] = x[0], y[0]
    batches = [{"x": x[i: i + 8], "labels": y[i: i + 8]} for i in (0, 8)]
    auto = ft.compute_fisher(model, batches, num_samples=16, params=["lora.weight"], progress=False)["lora.weight"]
    loop = ft.compute_fisher(model, batches, num_samples=16, params=["lora.weight"], engine="loop",
                             progress=False)["lora.weight"]
    torch.testing.assert_close(auto, loop, rtol=1e-5, atol=0)
    with pytest.raises(RuntimeError, match="not exact"):
        ft.compute_fisher(model, batches, num_samples=16, params=["lora.weight"], engine="vectorized", progress=False)


def test_embedding_lora_zero_init_trap_is_named():
    """Audit item 5: peft sets lora_embedding_A = 0, so lora_embedding_B scores 0; both checks missed it."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"],
                                                    init_lora_weights="pissa", task_type="CAUSAL_LM"))
    with pytest.warns(UserWarning, match="embedding LoRA factor.*lora_embedding_A"):
        zero = check_lora_init(model)
    assert any("lora_embedding_A" in z for z in zero)
    with pytest.warns(ft.ZeroFisherWarning, match="lora_embedding_B has zero gradient"):
        scores = ft.compute_fisher(model, lm_batches(1), num_samples=8, params=ft.peft_candidates(model),
                                   progress=False)
    assert not any(s.any() for n, s in scores.items() if "lora_embedding_B" in n)


# ----------------------------------------------------------------------------- 6: no label tokens
def test_causal_lm_calibration_without_label_tokens_is_an_error():
    model = lora(tiny_llama(), targets=("q_proj", "v_proj"), task="CAUSAL_LM")
    batches = lm_batches(2)
    for b in batches:
        b["labels"].fill_(-100)
    with pytest.raises(ValueError, match="there is no label to score"):
        ft.compute_fisher(model, batches, num_samples=16, params=ft.peft_candidates(model), progress=False)


# ----------------------------------------------------------------------------- 7 and 10: adapters on disk
def trained_pair(seed=0):
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    fisher = ft.compute_fisher(model, cls_batches(2), num_samples=16, params=ft.peft_candidates(model),
                               progress=False)
    mask = ft.select_mask(fisher, keep=0.1, always_train="classifier")
    return model, mask


def test_interrupted_save_adapter_never_leaves_a_mixed_pair(tmp_path, monkeypatch):
    """Audit item 7: new weights beside the old mask were accepted by load_adapter."""
    model, mask = trained_pair()
    ft.save_adapter(model, mask, tmp_path / "a")
    old = sorted(os.listdir(tmp_path / "a"))
    with torch.no_grad():
        for n in mask.names:
            model.get_parameter(n).add_(0.5)
    # Interrupted while writing the mask: nothing of the new save reaches the folder.
    real_save = ft.FishMask.save
    monkeypatch.setattr(ft.FishMask, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ft.save_adapter(model, mask, tmp_path / "a")
    monkeypatch.setattr(ft.FishMask, "save", real_save)
    assert sorted(os.listdir(tmp_path / "a")) == old
    reloaded, _ = ft.load_adapter(tiny_bert(), tmp_path / "a")
    n = mask.names[0]
    assert not torch.equal(reloaded.get_parameter(n), model.get_parameter(n))  # still the old weights
    # Interrupted between moving the new weights in and moving the new mask in: the pair is refused on load.
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(tmp_path / "a" / ft.FishMask.FILE_NAME):  # the last move of save_adapter
            raise KeyboardInterrupt()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        ft.save_adapter(model, mask, tmp_path / "a")
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(ValueError, match="not the adapter that fish_mask.safetensors was saved with"):
        ft.load_adapter(tiny_bert(), tmp_path / "a")


def test_load_adapter_under_another_adapter_name(tmp_path):
    """Audit item 10: names carried '.default.', so adapter_name='sst2' failed with 'not a parameter'."""
    model, mask = trained_pair()
    ft.save_adapter(model, mask, tmp_path / "a")
    reloaded, loaded = ft.load_adapter(tiny_bert(), tmp_path / "a", adapter_name="sst2")
    assert all(".sst2." in n for n in loaded.names)
    assert [n.replace(".sst2.", ".default.") for n in loaded.names] == mask.names
    assert all(torch.equal(loaded.indices[n], mask.indices[n.replace(".sst2.", ".default.")]) for n in loaded.names)
    assert loaded.always_train == [n.replace(".default.", ".sst2.") for n in mask.always_train]
    opt = ft.make_optimizer(reloaded, loaded)  # and it trains under the mapped mask
    assert opt.mask is loaded


# ----------------------------------------------------------------------------- 9: counts
def test_trainable_count_counts_only_parameters_that_train():
    """Audit item 9: the always-train pattern also matched peft's frozen classifier.original_module."""
    model, mask = trained_pair()
    truth = mask.num_selected + sum(p.numel() for n, p in model.named_parameters()
                                    if p.requires_grad and n not in mask.shapes)
    assert any("original_module" in n for n, _ in model.named_parameters())
    assert mask.trainable_count(model) == truth


# ----------------------------------------------------------------------------- 11: optimizer states
def test_optimizer_states_from_elsewhere_are_refused():
    model, mask = trained_pair()
    fisher = {n: torch.rand(model.get_parameter(n).shape) for n in mask.names}
    # Another mask with the same per-tensor counts: only the fingerprint can tell them apart.
    other = dataclasses.replace(mask, indices={n: torch.sort(torch.randperm(fisher[n].numel())[: len(i)]).values
                                               for n, i in mask.indices.items()})
    assert {n: len(i) for n, i in other.indices.items()} == {n: len(i) for n, i in mask.indices.items()}
    opt = ft.SparseAdamW(model, mask, lr=1e-2)
    model(**cls_batches(1)[0]).loss.backward()
    opt.step()
    state = opt.state_dict()
    opt.close()
    with pytest.raises(ValueError, match="another mask"):
        ft.SparseAdamW(model, other).load_state_dict(state)
    masked = ft.make_optimizer(model, mask, sparse=False)
    with pytest.raises(ValueError, match="saved by SparseAdamW.*not MaskedOptimizer"):
        masked.load_state_dict(state)
    masked.close()
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="not saved by a SparseAdamW"):
        ft.SparseAdamW(model, mask).load_state_dict(sgd.state_dict())


# ----------------------------------------------------------------------------- 12: precision
def test_float64_scores_ranked_in_their_own_precision():
    scores = {"a": torch.tensor([1.0, 1.0 + 1e-12], dtype=torch.float64)}
    assert ft.select_mask(scores, budget=1).indices["a"].tolist() == [1]
    assert ft.select_mask(scores, budget=1, strategy="rev").indices["a"].tolist() == [0]


# ----------------------------------------------------------------------------- section 3: early, clear errors
@pytest.mark.parametrize("kwargs", [dict(keep=1.5), dict(keep=0), dict(keep="0.05"), dict(budget=0),
                                    dict(keep=0.1, exclude="layer[")])
def test_fish_callback_checks_its_arguments_at_construction(kwargs):
    with pytest.raises(ValueError, match="keep|budget|exclude"):
        ft.FishCallback(**kwargs)


def test_select_mask_input_errors_are_clear():
    with pytest.raises(ValueError, match="every candidate tensor is empty"):
        ft.select_mask({"a": torch.zeros(0), "b": torch.zeros(0, 3)}, keep=0.5)
    scores = {"x.w": torch.rand(10)}
    with pytest.raises(ValueError, match="exclude: 'x\\[' is not a valid regular expression"):
        ft.select_mask(scores, keep=0.5, exclude="x[")
    with pytest.raises(ValueError, match="always_train: '\\(' is not a valid"):
        ft.select_mask(scores, keep=0.5, always_train="(")
    with pytest.raises(ValueError, match="integer seed"):
        ft.select_mask(scores, keep=0.5, strategy="rand", seed=None)
    assert ft.select_mask(scores, budget=np.int64(3)).num_selected == 3
    assert ft.select_mask(scores, keep=np.float32(0.3)).num_selected == 3
    assert ft.select_mask(scores, keep=torch.tensor(0.3)).num_selected == 3
    assert ft.select_mask(scores, budget=torch.tensor(4)).num_selected == 4


def test_mask_load_of_a_directory_says_so(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory; pass the mask file"):
        ft.FishMask.load(tmp_path)


def test_masked_entries_identical_after_resuming_a_sparse_state():
    model, mask = trained_pair()
    before = snapshot(model)
    opt = ft.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
    for batch in cls_batches(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    opt.close()
    again = ft.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
    again.load_state_dict(state)
    model(**cls_batches(1, seed=9)[0]).loss.backward()
    again.step()
    after = dict(model.named_parameters())
    for n in mask.names:
        frozen = ~mask.bool_mask(n)
        assert torch.equal(after[n].detach()[frozen], before[n][frozen])
