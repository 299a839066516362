"""QLoRA: a bitsandbytes 4-bit base + LoRA (QPiSSA / LoftQ init) + FISH, from Python and `fish-tune train`.

The tiny Llama here has hidden size 64: on a CPU with AVX512-bf16, bitsandbytes repacks a 4-bit weight for its
inference kernel in blocks of 64 input features (a 32-wide layer fails there, in bitsandbytes).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import fish_tuning as ft
from conftest import VOCAB
from helpers import ListDataset, assert_only_kept_moved, snapshot

bnb = pytest.importorskip("bitsandbytes")
from fish_tuning.methods.quantized import (  # noqa: E402
    bnb_4bit_config,
    load_quantized,
    loftq_model,
    qpissa,
    quantization_error,
    quantized_bits,
    require_bitsandbytes,
)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "v_proj", "o_proj")


def tiny_llama64(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=4, bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def lora_config(init="pissa", r=4, **kw) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), init_lora_weights=init,
                      lora_dropout=0.0, task_type="CAUSAL_LM", **kw)


def batches(n=2, size=4, seq=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, VOCAB, (size, seq), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qlora") / "llama64"
    tiny_llama64().save_pretrained(path)
    return path


def quantized_qpissa(base_dir, tmp_path, **kw):
    return qpissa(base_dir, lora_config(**kw), bnb_4bit_config(), residual_dir=tmp_path / "residual")


def _fit_error(layer, weight) -> float:
    q = layer.get_base_layer().weight
    deq = bnb.functional.dequantize_4bit(q.data, q.quant_state).float()
    approx = deq + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    return float((approx.detach() - weight).norm() / weight.norm())


# --------------------------------------------------------------------------- inits
def test_qpissa_and_loftq_fit_the_weights_better_than_plain_nf4(base_dir, tmp_path):
    full = LlamaForCausalLM.from_pretrained(base_dir)
    for build in (lambda: quantized_qpissa(base_dir, tmp_path), lambda: loftq_model(base_dir, lora_config(True),
                                                                                   bnb_4bit_config())):
        model = build()
        assert quantized_bits(model) == 4
        for i in range(2):
            layer = model.base_model.model.model.layers[i].self_attn.q_proj
            weight = full.model.layers[i].self_attn.q_proj.weight.detach()
            assert bool(layer.lora_B["default"].weight.any())  # both factors non-zero: A has Fisher
            assert _fit_error(layer, weight) < quantization_error(weight)


def test_qpissa_refuses_a_plain_init_or_a_quantized_base(base_dir):
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        qpissa(base_dir, lora_config(True), bnb_4bit_config())
    with pytest.raises(ValueError, match="full-precision base"):
        qpissa(load_quantized(base_dir, bnb_4bit_config()), lora_config(), bnb_4bit_config())
    with pytest.raises(ValueError, match="nf4"):
        bnb_4bit_config("int4")


def test_qpissa_refuses_a_residual_dir_in_use(base_dir, tmp_path):
    (tmp_path / "residual").mkdir()
    (tmp_path / "residual" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        quantized_qpissa(base_dir, tmp_path)
    assert (tmp_path / "residual" / "x").read_text() == "keep"


# --------------------------------------------------------------------------- Fisher
@pytest.mark.parametrize("use_dora", [False, True])
def test_fisher_on_the_4bit_model_is_the_per_sample_loop_and_stays_vectorised(base_dir, tmp_path, use_dora):
    model = quantized_qpissa(base_dir, tmp_path, use_dora=use_dora)
    cand = ft.peft_candidates(model)
    assert cand and all(".lora_" in n for n in cand)  # the 4-bit base weights are never candidates
    data = batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.ZeroFisherWarning)
        fast = ft.compute_fisher(model, data, num_samples=8, params=cand, engine="vectorized", progress=False)
    slow = ft.compute_fisher(model, data, num_samples=8, params=cand, engine="loop", progress=False)
    for name in cand:
        assert bool(fast[name].any()), name
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-12)


def test_plain_qlora_init_keeps_its_zero_fisher_warning(base_dir):
    model = get_peft_model(load_quantized(base_dir, bnb_4bit_config()), lora_config(True))
    with pytest.warns(UserWarning, match="init_lora_weights='pissa'"):
        ft.methods.check_lora_init(model)
    with pytest.warns(ft.ZeroFisherWarning):
        ft.compute_fisher(model, batches(1), num_samples=4, params=ft.peft_candidates(model), progress=False)


def test_fp32_mask_applies_to_the_4bit_model_with_the_same_names_and_shapes(base_dir, tmp_path):
    fp32 = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), lora_config())
    mask = ft.select_mask(ft.compute_fisher(fp32, batches(), num_samples=8, params=ft.peft_candidates(fp32),
                                            progress=False), keep=0.1)
    mask.save(tmp_path / "m.safetensors")
    q4 = quantized_qpissa(base_dir, tmp_path)
    loaded = ft.FishMask.load(tmp_path / "m.safetensors", model=q4)  # names and shapes match: accepted
    assert loaded.num_selected == mask.num_selected
    other = quantized_qpissa(base_dir, tmp_path / "r2", r=2)
    with pytest.raises(ValueError, match="shape"):
        ft.FishMask.load(tmp_path / "m.safetensors", model=other)


# --------------------------------------------------------------------------- masked training
def _mask(model, keep=0.2):
    return ft.select_mask(ft.compute_fisher(model, batches(), num_samples=8, params=ft.peft_candidates(model),
                                            progress=False), keep=keep)


@pytest.mark.parametrize("kind", ["AdamW8bit", "PagedAdamW8bit", "SparseAdamW"])
def test_masked_entries_stay_bit_identical_under_8bit_optimizers(base_dir, tmp_path, kind):
    model = quantized_qpissa(base_dir, tmp_path)
    mask = _mask(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "SparseAdamW":
        opt = ft.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
    else:
        opt = ft.MaskedOptimizer(getattr(bnb.optim, kind)(params, lr=1e-2, weight_decay=0.1, min_8bit_size=16),
                                 mask, model)
    before = snapshot(model)
    model.train()
    for batch in batches(3, seed=5):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    assert assert_only_kept_moved(model, mask, before) > mask.num_selected // 2


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_trainer_bnb_optimizers_through_fish_callback(base_dir, tmp_path, optim):
    from transformers import Trainer, TrainingArguments

    model = quantized_qpissa(base_dir, tmp_path)
    before = snapshot(model)
    rows = ListDataset([{k: v[i] for k, v in b.items()} for b in batches(4, seed=7) for i in range(4)])
    fish = ft.FishCallback(keep=0.2, num_samples=8)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             weight_decay=0.1, optim=optim, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[fish])
    with fish:
        trainer.train()
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert type(inner).__module__.startswith("bitsandbytes")
    assert assert_only_kept_moved(model, fish.mask, before) > 0


def test_save_then_load_adapter_onto_the_4bit_residual_base(base_dir, tmp_path):
    model = quantized_qpissa(base_dir, tmp_path)
    mask = _mask(model)
    opt = ft.MaskedOptimizer(bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                             mask, model)
    model.train()
    model(**batches(1)[0]).loss.backward()
    opt.step()
    model.eval()
    probe = batches(1, seed=9)[0]
    with torch.no_grad():
        expected = model(**probe).logits
    ft.save_adapter(model, mask, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == tmp_path / "residual"  # the adapter names its base
    base = load_quantized(tmp_path / "residual", bnb_4bit_config())
    loaded, loaded_mask = ft.load_adapter(base, tmp_path / "adapter")
    assert loaded_mask.fingerprint() == mask.fingerprint()
    trained = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[name]), name
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**probe).logits, expected)


# --------------------------------------------------------------------------- reliability rows
def test_8bit_base_fisher_and_masked_training(base_dir, tmp_path):
    from transformers import BitsAndBytesConfig

    model = qpissa(base_dir, lora_config(), BitsAndBytesConfig(load_in_8bit=True), residual_dir=tmp_path / "r8")
    assert quantized_bits(model) == 8
    cand = ft.peft_candidates(model)
    fast = ft.compute_fisher(model, batches(), num_samples=8, params=cand, engine="vectorized", progress=False)
    slow = ft.compute_fisher(model, batches(), num_samples=8, params=cand, engine="loop", progress=False)
    for name in cand:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-12)
    mask = ft.select_mask(fast, keep=0.2)
    opt = ft.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    model.train()
    model(**batches(1)[0]).loss.backward()
    opt.step()
    assert assert_only_kept_moved(model, mask, before) > 0


def test_no_bitsandbytes_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    from fish_tuning.cli import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"fish-tuning\[qlora\]"):
        require_bitsandbytes()
    code = main(["train", "--model_name_or_path", "nowhere/never-loaded", "--train_file",
                 str(ROOT / "examples/data/sft.jsonl"), "--keep", "0.05", "--load_in_4bit", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == "fish-tune: error: --load_in_4bit needs bitsandbytes: pip install 'fish-tuning[qlora]'"


def _lora_grads(model, batch):
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_stay_exact_after_an_eval_forward_on_cpu(base_dir, tmp_path):
    """bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel at the first eval-mode forward (AVX512-
    bf16 CPUs) and its backward is wrong after that; the Fisher pass and a validation pass run in eval mode."""
    from fish_tuning.compat import keep_cpu_4bit_trainable

    model = quantized_qpissa(base_dir, tmp_path)  # load_quantized turns the repacking off
    batch = batches(1)[0]
    before = _lora_grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(**batch)
    ft.compute_fisher(model, [batch], num_samples=4, progress=False)
    after = _lora_grads(model, batch)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-bf16: bitsandbytes never repacks here")
    plain = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir, quantization_config=bnb_4bit_config()),
                           lora_config(True))
    plain.eval()
    with torch.no_grad():
        plain(**batch)  # repacked now
    with pytest.raises(ValueError, match="repacked by bitsandbytes"):
        keep_cpu_4bit_trainable(plain)


def _hand_loaded(base_dir):
    """A 4-bit peft model loaded the usual way (not through load_quantized), B non-zero so both factors have
    gradients."""
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir, quantization_config=bnb_4bit_config()),
                           lora_config(True))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_fisher_and_fish_callback_keep_a_hand_loaded_4bit_model_trainable(base_dir):
    """A 4-bit model loaded by hand on an AVX512-bf16 CPU: the Fisher pass (eval mode) and a validation pass after
    it leave the training gradients exact (compute_fisher turns the repacking off first); a model repacked before
    is refused by compute_fisher, never scored with wrong gradients."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-bf16: bitsandbytes never repacks here")
    batch = batches(1)[0]
    model = _hand_loaded(base_dir)
    before = _lora_grads(model, batch)
    ft.compute_fisher(model, [batch], num_samples=4, progress=False)
    model.eval()
    with torch.no_grad():
        model(**batch)  # a validation pass
    after = _lora_grads(model, batch)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    repacked = _hand_loaded(base_dir)
    repacked.eval()
    with torch.no_grad():
        repacked(**batch)
    with pytest.raises(ValueError, match="repacked by bitsandbytes"):
        ft.compute_fisher(repacked, [batch], num_samples=4, progress=False)
