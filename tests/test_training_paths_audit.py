"""Masked training through Trainer options, user optimizers, plain torch optimizers, dtype changes and peft round trips:
exactly the kept entries train, masked entries stay bit-identical, or the library refuses before anything moves."""

from __future__ import annotations

import re

import pytest
import torch
from peft import IA3Config, get_peft_model
from transformers import Trainer, TrainingArguments

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert
from helpers import ListDataset, assert_only_kept_moved, snapshot


def rows(n_batches: int = 6, batch_size: int = 8) -> ListDataset:
    return ListDataset([{k: v[i] for k, v in b.items()} for b in cls_batches(n_batches, batch_size)
                        for i in range(batch_size)])


def make_args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                weight_decay=0.1, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=True, seed=0, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def selected(model=None, keep: float = 0.1):
    model = model if model is not None else lora(tiny_bert(), modules_to_save=["classifier"])
    fisher = ft.compute_fisher(model, cls_batches(2, 8), num_samples=16, params=ft.peft_candidates(model),
                               progress=False)
    always = [re.escape(n) + "$" for n in ft.always_trainable(model)]
    return model, ft.select_mask(fisher, keep=keep, always_train=always)


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def biggest(mask: ft.FishMask) -> str:
    return max(mask.names, key=lambda n: mask.indices[n].numel())


@pytest.mark.parametrize("kw", [
    dict(optim="adamw_torch_fused", gradient_accumulation_steps=5, max_steps=-1, num_train_epochs=2),  # partial GA
    dict(optim="adafactor", max_grad_norm=1e-3),
    dict(optim="sgd", optim_args="momentum=0.9", lr_scheduler_type="cosine_with_restarts", warmup_steps=2,
         lr_scheduler_kwargs={"num_cycles": 2}),
    dict(optim="rmsprop", neftune_noise_alpha=5.0, label_smoothing_factor=0.1),
    dict(optim="adagrad", include_num_input_tokens_seen=True, eval_strategy="steps", eval_steps=2),
])
def test_trainer_options_train_exactly_the_kept_entries(tmp_path, kw):
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    before = snapshot(model)
    fish = ft.FishCallback(keep=0.1, num_samples=16)
    trainer = Trainer(model=model, args=make_args(tmp_path, **kw), train_dataset=rows(), eval_dataset=rows(1),
                      callbacks=[fish])
    with fish:
        trainer.train()
    assert assert_only_kept_moved(model, fish.mask, before) == fish.mask.num_selected


def test_user_optimizer_and_scheduler_tuple(tmp_path):
    model, mask = selected()
    before = snapshot(model)
    opt = torch.optim.SGD(trainable(model), lr=1e-1, momentum=0.9, weight_decay=0.1)
    fish = ft.FishCallback(mask=mask)
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=rows(), callbacks=[fish],
                      optimizers=(opt, torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)))
    with fish:
        trainer.train()
    assert assert_only_kept_moved(model, mask, before) == mask.num_selected


def test_trainer_refuses_a_kept_candidate_outside_its_optimizer(tmp_path):
    # Old code: the lora_B tensors were never stepped, so half the kept entries silently stayed frozen while
    # fish/kept reported all of them.
    model, mask = selected()
    before = snapshot(model)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if p.requires_grad and "lora_B" not in n])
    fish = ft.FishCallback(mask=mask)
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=rows(), callbacks=[fish],
                      optimizers=(opt, None))
    with fish, pytest.raises(ValueError, match="lora_B.*not in the Trainer's optimizer"):
        trainer.train()
    assert fish.guard is None
    after = snapshot(model)
    assert all(torch.equal(after[n], before[n]) for n in mask.names)


@pytest.mark.parametrize("how", ["masked_optimizer", "guard", "sparse_groups", "callback"])
def test_kept_candidate_frozen_after_selection_is_refused(tmp_path, how):
    # Old code: MaskedOptimizer / MaskGuard / FishCallback(mask=) trained the other tensors and silently left the
    # kept entries of the frozen candidate untouched (SparseAdamW(model, mask) alone refused).
    model, mask = selected()
    name = biggest(mask)
    dict(model.named_parameters())[name].requires_grad_(False)
    match = f"'{re.escape(name)}' keeps {mask.indices[name].numel()} entries but does not require grad"
    with pytest.raises(ValueError, match=match):
        if how == "masked_optimizer":
            ft.MaskedOptimizer(torch.optim.AdamW(trainable(model)), mask, model)
        elif how == "guard":
            ft.MaskGuard(mask, model, optimizer=torch.optim.AdamW(trainable(model))).attach()
        elif how == "sparse_groups":
            ft.SparseAdamW([{"params": trainable(model)}], mask, model=model)
        else:
            fish = ft.FishCallback(mask=mask)
            with fish:
                Trainer(model=model, args=make_args(tmp_path), train_dataset=rows(), callbacks=[fish]).train()


@pytest.mark.parametrize("hooked", [False, True])
def test_dtype_change_after_some_steps_keeps_masked_entries(hooked):
    # Old code: the step backup kept the old dtype, so writing masked entries back raised after the step had already
    # moved them (weight decay), and left them moved; on the hook path close() raised too and kept the hooks.
    model, mask = selected()
    batches = cls_batches(2, 8)
    opt = torch.optim.SGD(trainable(model), lr=1e-1, weight_decay=0.1)
    stepper = ft.MaskGuard(mask, model, optimizer=opt).attach() if hooked else ft.MaskedOptimizer(opt, mask, model)
    step = opt if hooked else stepper
    model.train()
    for i in range(4):
        if i == 2:
            model.to(torch.bfloat16)
            before = snapshot(model)
        model(**batches[i % 2]).loss.backward()
        step.step()
        step.zero_grad()
    assert assert_only_kept_moved(model, mask, before) > 0.5 * mask.num_selected
    stepper.close()


@pytest.mark.parametrize("make, closure", [
    (lambda ps: torch.optim.Adagrad(ps, lr=1e-2, weight_decay=0.1), False),
    (lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=4, line_search_fn="strong_wolfe"), True),
    (lambda ps: torch.optim.ASGD(ps, lr=1e-2, weight_decay=0.1), False),
    (lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True), False),
])
def test_plain_loop_torch_optimizers(make, closure):
    model, mask = selected()
    before = snapshot(model)
    opt = ft.MaskedOptimizer(make(trainable(model)), mask, model)
    model.train()
    for b in cls_batches(3, 8):
        def loss_fn(b=b):
            opt.zero_grad()
            loss = model(**b).loss
            loss.backward()
            return loss
        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()
    assert assert_only_kept_moved(model, mask, before) == mask.num_selected


def test_sparse_adam_with_dense_gradients_is_refused_by_torch():
    model, mask = selected()
    before = snapshot(model)
    opt = ft.MaskedOptimizer(torch.optim.SparseAdam(trainable(model)), mask, model)
    model(**cls_batches(1, 8)[0]).loss.backward()
    with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients"):
        opt.step()
    assert assert_only_kept_moved(model, mask, before) == 0


def test_tied_candidates_are_one_tensor_with_one_mask():
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    layers = model.base_model.model.bert.encoder.layer
    layers[1].attention.self.query.lora_A["default"].weight = layers[0].attention.self.query.lora_A["default"].weight
    model, mask = selected(model)
    assert [n for n in mask.names if "query.lora_A" in n] == [n for n in ft.peft_candidates(model)
                                                              if "query.lora_A" in n]
    before = snapshot(model)
    opt = ft.MaskedOptimizer(torch.optim.AdamW(trainable(model), lr=1e-2, weight_decay=0.1), mask, model)
    for b in cls_batches(2, 8):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    assert assert_only_kept_moved(model, mask, before) == mask.num_selected


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_saved_reloaded_and_merged_models_agree_with_the_mask(tmp_path, method):
    if method == "ia3":
        model = get_peft_model(tiny_bert(), IA3Config(target_modules=["key", "value", "output.dense"],
                                                      feedforward_modules=["output.dense"], task_type="SEQ_CLS"))
    else:
        model = lora(tiny_bert(), use_dora=method == "dora", modules_to_save=["classifier"])
    model, mask = selected(model, keep=0.2)
    before = snapshot(model)
    opt = ft.MaskedOptimizer(torch.optim.AdamW(trainable(model), lr=1e-2, weight_decay=0.1), mask, model)
    model.train()
    for b in cls_batches(3, 8):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    opt.close()
    assert assert_only_kept_moved(model, mask, before) == mask.num_selected
    inputs = {k: v for k, v in cls_batches(1, 8, seed=5)[0].items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        ref = model(**inputs).logits
    ft.save_adapter(model, mask, tmp_path / "adapter")
    loaded, loaded_mask = ft.load_adapter(tiny_bert(), tmp_path / "adapter")
    assert loaded_mask.fingerprint() == mask.fingerprint()
    assert assert_only_kept_moved(loaded, mask, before) == mask.num_selected  # on disk: masked = selection time
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs).logits, ref)
        if method == "lora":  # merged weight = base + scale * B A of the trained factors
            layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
            expected = layer.base_layer.weight + layer.scaling["default"] * (
                layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).logits, ref, rtol=0, atol=1e-5)
        if method == "lora":
            torch.testing.assert_close(merged.bert.encoder.layer[0].attention.self.query.weight, expected)
