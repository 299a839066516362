"""FISH with the ``adapters`` library: bottleneck Adapters, Prefix-Tuning, LoRA and UniPELT (tiny BERT and Llama).

Runs in .venv-adapters (transformers 4.57); skipped where ``adapters`` is not installed.
"""

import pytest
import torch

adapters = pytest.importorskip("adapters")

import fish_tuning as ft  # noqa: E402
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama  # noqa: E402
from fish_e2e import fish_train, minilm_path, outputs, real_sst2, trainable_numel  # noqa: E402
from fish_tuning.methods import method_gates  # noqa: E402
from fish_tuning.methods.baselines import baseline_budget, top_layers  # noqa: E402

METHODS = ["seq_bn", "double_seq_bn", "prefix_tuning", "lora", "unipelt"]
KIND = {  # parts of the candidates each method must contribute
    "seq_bn": ("adapter_down", "adapter_up"), "double_seq_bn": ("adapter_down", "adapter_up"),
    "prefix_tuning": ("wte", "control_trans"), "lora": ("lora_A", "lora_B"),
    "unipelt": ("adapter_down", "adapter_up", "wte", "control_trans", "lora_A", "lora_B"),
}
NOT_A_CANDIDATE = ("heads.", "gate")


def build(arch, method, seed=0):
    """BERT: BertAdapterModel with a flex classification head (saved with the adapter); Llama: a causal LM."""
    torch.manual_seed(seed)
    if arch == "bert":
        model = adapters.BertAdapterModel(tiny_bert(seed=seed).config)
        model.add_adapter("t", config=method)
        model.add_classification_head("t", num_labels=2)
    else:
        model = tiny_llama(seed=seed)
        adapters.init(model)
        model.add_adapter("t", config=method)
    model.train_adapter("t")
    return model.eval()


def batches_for(arch, n=2):
    return cls_batches(n_batches=n) if arch == "bert" else lm_batches(n_batches=n)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_fish_end_to_end(arch, method):
    model = build(arch, method)
    cand, always, gates = ft.peft_candidates(model), ft.always_trainable(model), method_gates(model)
    assert {k for n in cand for k in KIND[method] if k in n} == set(KIND[method])
    assert not any(x in n for n in cand for x in NOT_A_CANDIDATE)
    assert set(gates) <= set(always)
    assert all(n in gates or n.startswith("heads.") for n in always)
    assert bool([n for n in always if n.startswith("heads.")]) == (arch == "bert")
    if method == "unipelt":  # W_G of all three parts train fully, outside the budget
        assert {k for n in gates for k in ("loras", "adapters", "prefix_gates") if k in n} == {
            "loras", "adapters", "prefix_gates"}
    else:
        assert gates == []
    fish_train(model, batches_for(arch))


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", ["seq_bn", "unipelt"])
def test_save_and_reload_adapter_and_mask(tmp_path, arch, method):
    model = build(arch, method)
    batches = batches_for(arch)
    mask = fish_train(model, batches, steps=2)
    expected = outputs(model, batches[1])
    model.save_adapter(str(tmp_path / "adapter"), "t")
    mask.save(tmp_path / "fish_mask.safetensors")

    if arch == "bert":
        torch.manual_seed(0)
        fresh = adapters.BertAdapterModel(tiny_bert(seed=0).config)
    else:
        fresh = tiny_llama(seed=0)
        adapters.init(fresh)
    name = fresh.load_adapter(str(tmp_path / "adapter"))
    fresh.train_adapter(name)
    if arch == "bert":
        fresh.active_head = name  # the head saved with the adapter
    fresh.eval()
    mask2 = ft.FishMask.load(tmp_path / "fish_mask.safetensors", model=fresh)
    assert set(mask2.names) == set(ft.peft_candidates(fresh))
    assert all(torch.equal(mask2.indices[n], mask.indices[n]) for n in mask.names)
    torch.testing.assert_close(outputs(fresh, batches[1]), expected, rtol=1e-5, atol=1e-6)
    ft.MaskedOptimizer(torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad]), mask2, fresh)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_baseline_budget_equals_adapters_trainable_count(arch, method):
    model = build(arch, method)
    expected = trainable_numel(model, exclude=NOT_A_CANDIDATE)
    base = tiny_bert() if arch == "bert" else tiny_llama()
    assert baseline_budget(base, method) == expected
    assert baseline_budget(base, adapters.AdapterConfig.load(method)) == expected
    assert baseline_budget(model, method) == expected  # also from a model that already carries adapters
    assert all(p.device.type == "cpu" for p in base.parameters())


@pytest.mark.parametrize("method", ["seq_bn", "lora", "unipelt"])
def test_top_layers_sets_leave_out(method):
    base = tiny_bert()
    cfg = top_layers(method, 1, model=base)
    parts = cfg.configs if hasattr(cfg, "configs") else [cfg]
    assert all(list(c.leave_out) == [0] for c in parts)
    model = adapters.BertAdapterModel(base.config)
    model.add_adapter("t", config=cfg)
    model.train_adapter("t")
    cand = ft.peft_candidates(model)
    per_layer = [n for n in cand if "prefix_tuning.pool" not in n]  # the prefix pool is stored once, at layer 0
    assert per_layer and all(".layer.1." in n for n in per_layer)
    assert baseline_budget(base, cfg) < baseline_budget(base, method)
    if method != "unipelt":
        assert 2 * baseline_budget(base, cfg) == baseline_budget(base, method)


@pytest.mark.real
def test_real_minilm_sst2_unipelt():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = real_sst2(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    adapters.init(model)
    model.add_adapter("sst2", config="unipelt")
    model.train_adapter("sst2")
    model.eval()
    k = baseline_budget(model, top_layers("seq_bn", 2, model=model))  # a 2-of-6-layer Adapter baseline
    mask = fish_train(model, batches, budget=k, steps=3, lr=5e-3, num_samples=8)
    assert mask.num_selected == k
    assert "classifier.weight" in ft.always_trainable(model) and method_gates(model)
