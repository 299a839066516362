"""Every peft method of the paper end to end with FISH masks: LoRA, DoRA, (IA)³, Prefix-Tuning (BERT and Llama)."""

import dataclasses

import pytest
import torch
import transformers
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    get_peft_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file

import fish_tuning as ft
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from fish_e2e import fish_train, minilm_path, outputs, real_sst2, trainable_numel
from fish_tuning.compat import prefix_tuning_compat
from fish_tuning.methods.baselines import baseline_budget, top_layers

ARCH = {  # name -> (base model factory, task type, batches, LoRA targets)
    "bert": (tiny_bert, "SEQ_CLS", cls_batches, ["query", "value"]),
    "llama": (tiny_llama, "CAUSAL_LM", lm_batches, ["q_proj", "v_proj"]),
}
METHODS = ["lora", "dora", "ia3", "prefix", "prefix_proj"]
KIND = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude_vector"), "ia3": ("ia3_l",),
        "prefix": ("prompt_encoder",), "prefix_proj": ("prompt_encoder",)}


def config(method, arch):
    _, task, _, targets = ARCH[arch]
    if method in ("lora", "dora"):
        return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa", lora_dropout=0.0,
                          use_dora=method == "dora", task_type=task)
    if method == "ia3":
        return IA3Config(task_type=task)
    return PrefixTuningConfig(task_type=task, num_virtual_tokens=30, prefix_projection=method == "prefix_proj",
                              encoder_hidden_size=16)


def build(method, arch, seed=0):
    make = ARCH[arch][0]
    model = get_peft_model(make(seed=seed), config(method, arch))
    return prefix_tuning_compat(model) if method.startswith("prefix") else model


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_fish_end_to_end(method, arch):
    model = build(method, arch)
    cand = ft.peft_candidates(model)
    assert all(any(k in n for k in KIND[method]) for n in cand)
    assert {k for n in cand for k in KIND[method] if k in n} == set(KIND[method])  # every part is a candidate
    always = ft.always_trainable(model)
    assert all("modules_to_save" in n for n in always) and bool(always) == (arch == "bert")  # the head only
    fish_train(model, ARCH[arch][2](n_batches=2))


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix"])
def test_save_and_reload_adapter_and_mask(tmp_path, method, arch):
    model = build(method, arch)
    batches = ARCH[arch][2](n_batches=2)
    mask = fish_train(model, batches, steps=2)
    expected = outputs(model, batches[1])
    model.save_pretrained(tmp_path / "adapter")
    mask.save(tmp_path / "fish_mask.safetensors")

    base = ARCH[arch][0](seed=0)  # the same random base weights, as a pretrained model would be
    if method == "prefix":  # peft cannot load prompt learning as trainable: rebuild, then load the state dict
        reloaded = prefix_tuning_compat(get_peft_model(base, PeftConfig.from_pretrained(tmp_path / "adapter")))
        set_peft_model_state_dict(reloaded, load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    else:
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    mask2 = ft.FishMask.load(tmp_path / "fish_mask.safetensors", model=reloaded)
    assert mask2.names == mask.names and all(torch.equal(mask2.indices[n], mask.indices[n]) for n in mask.names)
    assert set(mask2.names) == set(ft.peft_candidates(reloaded))
    torch.testing.assert_close(outputs(reloaded, batches[1]), expected, rtol=1e-5, atol=1e-6)
    # The reloaded model keeps training under the same mask.
    fish_opt = ft.MaskedOptimizer(torch.optim.AdamW([p for p in reloaded.parameters() if p.requires_grad]),
                                  mask2, reloaded)
    assert fish_opt.mask.num_selected == mask.num_selected


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_baseline_budget_equals_peft_trainable_count(method, arch):
    base = ARCH[arch][0]()
    cfg = config(method, arch)
    budget = baseline_budget(base, cfg)
    built = get_peft_model(ARCH[arch][0](), config(method, arch))
    assert budget == trainable_numel(built, exclude=("modules_to_save",))
    assert all(p.device.type == "cpu" for p in base.parameters())  # the meta skeleton left the model alone


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_top_layers_restricts_to_layers_nearest_the_output(method, arch):
    base = ARCH[arch][0]()
    assert top_layers(base, 1) == [1] and top_layers(base, 2) == [0, 1]
    cfg = top_layers(config(method, arch), 1, model=base)
    top = get_peft_model(ARCH[arch][0](), cfg)
    full = get_peft_model(ARCH[arch][0](), config(method, arch))
    top_c, full_c = ft.peft_candidates(top), ft.peft_candidates(full)
    assert top_c == [n for n in full_c if ".1." in n]  # same tensors (shapes below), only in the top layer
    shapes = dict(full.named_parameters())
    assert all(p.shape == shapes[n].shape for n, p in top.named_parameters() if n in top_c)
    assert baseline_budget(base, cfg) == baseline_budget(base, config(method, arch)) // 2


def test_fixed_proportion_protocol_gives_fish_the_baseline_budget():
    """The paper's comparison: FISH on more layers gets exactly the entries of the baseline on fewer layers."""
    base = tiny_bert()
    lora_cfg = config("lora", "bert")
    k = baseline_budget(base, top_layers(lora_cfg, 1, model=base))
    model = get_peft_model(tiny_bert(), top_layers(lora_cfg, 2, num_layers=2))
    fisher = ft.compute_fisher(model, cls_batches(), num_samples=16, params=ft.peft_candidates(model), progress=False)
    mask = ft.select_mask(fisher, budget=k)
    assert mask.num_selected == k == mask.num_candidates // 2


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="the cache rename is transformers 5")
def test_prefix_tuning_compat_is_needed_and_idempotent():
    model = get_peft_model(tiny_bert(), config("prefix", "bert"))
    batch = cls_batches()[0]
    with pytest.raises(ValueError, match="past key values"):
        model(**batch)
    prefix_tuning_compat(model)
    forward = model.base_model.forward
    assert prefix_tuning_compat(model).base_model.forward is forward
    with_prefix = model(**batch).logits
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(2)
    assert not torch.allclose(model(**batch).logits, with_prefix)  # the prefix really reaches attention


def test_prefix_candidate_is_the_kv_table():
    model = build("prefix", "llama")
    (name,) = ft.peft_candidates(model)
    cfg = model.peft_config["default"]
    shape = dict(model.named_parameters())[name].shape
    assert tuple(shape) == (30, cfg.num_layers * 2 * cfg.token_dim)  # P^K and P^V of every layer


def test_bad_inputs_have_clear_messages():
    base = tiny_bert()
    with pytest.raises(ValueError, match="get_peft_model"):
        ft.peft_candidates(base)
    with pytest.raises(ValueError, match="n must be an integer"):
        top_layers(base, 3)
    with pytest.raises(ValueError, match="num_layers="):
        top_layers(config("lora", "bert"), 1)
    with pytest.raises(ValueError, match="model=base_model"):
        top_layers(IA3Config(task_type="SEQ_CLS"), 1, num_layers=2)
    with pytest.raises(ValueError, match="no per-layer option"):
        top_layers(config("prefix", "bert"), 1, model=base)
    regex = dataclasses.replace(config("lora", "bert"), target_modules=r".*query")
    with pytest.raises(ValueError, match="list of module names"):
        top_layers(regex, 1, model=base)
    with pytest.raises(ValueError, match="base model"):
        top_layers(IA3Config(task_type="SEQ_CLS"), 1, model=build("ia3", "bert"))
    with pytest.raises(TypeError, match="does not support"):
        top_layers(object(), 1, num_layers=2)


@pytest.mark.real
def test_real_minilm_sst2_ia3():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = real_sst2(tokenizer)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    cfg = top_layers(IA3Config(task_type="SEQ_CLS"), 3, model=base)  # a paper-style 3-of-6-layer baseline
    k = baseline_budget(base, cfg)
    model = get_peft_model(base, IA3Config(task_type="SEQ_CLS"))
    assert k * 2 == sum(p.numel() for n, p in model.named_parameters() if n in ft.peft_candidates(model))
    fish_train(model, batches, budget=k, steps=3, lr=5e-3, num_samples=8)


def test_adapters_missing_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "adapters", None)  # as if not installed, in either environment
    with pytest.raises(ImportError, match=r"pip install 'fish-tuning\[adapters\]'"):
        baseline_budget(tiny_bert(), "seq_bn")
    with pytest.raises(ImportError, match="adapters"):
        top_layers("unipelt", 1, num_layers=2)
    assert ft.peft_candidates(build("ia3", "bert"))  # peft models never need the adapters library
