"""FishCallback inside the stock transformers Trainer: masking, logs, checkpoints, resume, adapter round trip."""

import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert
from fish_tuning.integrations.trainer_checks import check_supported as _check_supported
from helpers import ListDataset, assert_only_kept_moved, snapshot


def bert_rows(n_batches=6, batch_size=8):
    return ListDataset([{k: v[i] for k, v in b.items()} for b in cls_batches(n_batches, batch_size) for i in range(batch_size)])


def make_args(out, steps=6, **kw):
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="linear",
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def train(out, callbacks, steps=4, model=None, resume=None, **kw):
    model = model if model is not None else lora(tiny_bert(), modules_to_save=["classifier"])
    trainer = Trainer(model=model, args=make_args(out, steps, **kw), train_dataset=bert_rows(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_callback_masks_trainer_adamw_and_logs_counts(tmp_path):
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    before = snapshot(model)
    cb = ft.FishCallback(keep=0.1, num_samples=16)
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=bert_rows(), callbacks=[cb])
    # The mask must be the one compute_fisher gives on the trainer's own calibration samples (collator and all).
    loader = ft.calibration_loader(trainer.train_dataset, 16, batch_size=4, collate_fn=trainer.data_collator, seed=0)
    fisher = ft.compute_fisher(model, loader, num_samples=16, params=ft.peft_candidates(model), progress=False)
    expected = ft.select_mask(fisher, keep=0.1)
    trainer.train()
    mask = cb.mask
    assert cb.source == "fisher" and set(mask.names) == set(ft.peft_candidates(model))
    assert all(torch.equal(mask.indices[n], expected.indices[n]) for n in mask.names)

    after = dict(model.named_parameters())
    assert assert_only_kept_moved(model, mask, before) > 0.9 * mask.num_selected
    head = [n for n in mask.always_train if "classifier" in n]
    assert head and all(not torch.equal(after[n].detach(), before[n]) for n in head)

    logged = [e for e in trainer.state.log_history if "fish/kept" in e]
    assert len(logged) == 1 and logged[0]["fish/kept"] == mask.num_selected == cb.stats["fish/kept"]
    assert logged[0]["fish/trainable"] == mask.num_selected + sum(after[n].numel() for n in mask.always_train)
    # train end: mask beside the output dir, and hooks gone so later training is not masked by surprise
    assert ft.FishMask.load(tmp_path / ft.FishMask.FILE_NAME, model).num_selected == mask.num_selected
    assert cb.guard is None


def test_fisher_pass_leaves_training_rng_alone(tmp_path):
    # keep=1.0 trains everything, so a FISH run must equal a plain run bit for bit: same data order and dropout.
    plain = train(tmp_path / "plain", [])
    fish = train(tmp_path / "fish", [ft.FishCallback(keep=1.0, num_samples=16)])
    a, b = snapshot(plain.model), snapshot(fish.model)
    assert all(torch.equal(a[n], b[n]) for n in a)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    full = train(tmp_path / "full", [ft.FishCallback(keep=0.1, num_samples=16)], steps=4)
    kw = dict(save_strategy="steps", save_steps=2)
    first = ft.FishCallback(keep=0.1, num_samples=16)
    train(tmp_path / "cut", [first, StopAt(2)], steps=4, **kw)
    ckpt = tmp_path / "cut" / "checkpoint-2"
    saved = ft.FishMask.load(ckpt / ft.FishMask.FILE_NAME)
    assert all(torch.equal(saved.indices[n], first.mask.indices[n]) for n in saved.names)

    # resume into another output_dir: the mask must come from the checkpoint given, not from output_dir
    second = ft.FishCallback(keep=0.1, num_samples=16)
    resumed = train(tmp_path / "resumed", [second], steps=4, resume=str(ckpt), **kw)
    assert second.source == "checkpoint"
    a, b = snapshot(full.model), snapshot(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a), "resumed run differs from the uninterrupted one"

    # The mask travels in the checkpoint's optimizer state: the resume does not depend on finding the file.
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    os.remove(moved / ft.FishMask.FILE_NAME)
    third = ft.FishCallback(keep=0.1, num_samples=16)
    again = train(tmp_path / "again", [third], steps=4, resume=str(moved), **kw)
    assert third.source == "checkpoint" and third.mask.fingerprint() == first.mask.fingerprint()
    assert all(torch.equal(a[n], b) for n, b in snapshot(again.model).items())

    # The interrupted run's own mask passed explicitly is fine; another mask is refused, not silently switched to.
    same = ft.FishCallback(mask=ft.FishMask.load(ckpt / ft.FishMask.FILE_NAME))
    train(tmp_path / "same", [same], steps=3, resume=str(ckpt), **kw)
    assert same.source == "given"
    other = ft.select_mask({n: torch.rand(first.mask.shapes[n]) for n in first.mask.names}, keep=0.1,
                           always_train=first.mask.always_train)
    with pytest.raises(ValueError, match="not the interrupted run's"):
        train(tmp_path / "other", [ft.FishCallback(mask=other)], steps=4, resume=str(ckpt), **kw)

    # A checkpoint of a run without FishCallback: a clear error, not a fresh mask over trained weights.
    train(tmp_path / "plain", [StopAt(2)], steps=4, **kw)
    with pytest.raises(FileNotFoundError, match="not written with FishCallback"):
        train(tmp_path / "bare_run", [ft.FishCallback(keep=0.1, num_samples=16)], steps=4,
              resume=str(tmp_path / "plain" / "checkpoint-2"), **kw)


def test_checkpoint_is_a_peft_adapter_with_mask_and_save_adapter_round_trip(tmp_path):
    cb = ft.FishCallback(keep=0.2, num_samples=16)
    trainer = train(tmp_path / "run", [cb], steps=2, save_strategy="steps", save_steps=2)
    ckpt = tmp_path / "run" / "checkpoint-2"
    reloaded, mask = ft.load_adapter(tiny_bert(), ckpt)
    assert isinstance(reloaded, PeftModel) and mask.num_selected == cb.mask.num_selected

    path = ft.save_adapter(trainer.model, cb.mask, tmp_path / "adapter")
    assert os.path.basename(path) == ft.FishMask.FILE_NAME
    plain = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")  # still a normal adapter directory
    model, mask = ft.load_adapter(tiny_bert(), tmp_path / "adapter")
    trained = dict(trainer.model.named_parameters())
    for n, p in model.named_parameters():
        if n in mask.shapes:
            assert torch.equal(p, trained[n])
    assert any(p.requires_grad for p in model.parameters()) and not any(p.requires_grad for p in plain.parameters())

    # continue training from the directory with the saved mask
    before = snapshot(model)
    train(tmp_path / "more", [ft.FishCallback(mask=mask)], steps=2, model=model)
    for name in mask.names:
        keep = mask.bool_mask(name)
        assert torch.equal(dict(model.named_parameters())[name].detach()[~keep], before[name][~keep])


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of keep"):
        ft.FishCallback()
    with pytest.raises(ValueError, match="not both"):
        ft.FishCallback(keep=0.1, mask=ft.select_mask({"a": torch.ones(3)}, keep=0.5))
    with pytest.raises(ValueError, match="strategy"):
        ft.FishCallback(keep=0.1, strategy="top")
    with pytest.raises(FileNotFoundError, match="fish_mask"):
        ft.load_adapter(tiny_bert(), tmp_path)
    cb, state, control = ft.FishCallback(keep=0.1), TrainerState(), TrainerControl()
    with pytest.raises(NotImplementedError, match="DeepSpeed"):
        cb.on_train_begin(SimpleNamespace(deepspeed={"zero_optimization": {"stage": 0}}, fsdp=None), state, control)
    for optim in ("lomo", "adalomo"):  # they update inside backward, with no step for the guard to hook
        with pytest.raises(NotImplementedError, match="LOMO"):
            _check_supported(SimpleNamespace(optim=optim, deepspeed=None, fsdp=None), tiny_bert())
    with pytest.MonkeyPatch.context() as mp:  # accelerate ran FSDP, but the parameters are not FSDP2 DTensors
        mp.setattr("fish_tuning.integrations.trainer_checks._accelerate_backend", lambda: "FSDP")
        with pytest.raises(NotImplementedError, match="FSDP version 2 only"):
            cb.on_train_begin(SimpleNamespace(deepspeed=None, fsdp="full_shard"), state, control, model=tiny_bert())
    with pytest.MonkeyPatch.context() as mp:  # FSDP asked for, but accelerate ran DDP (CPU): a warning, then DDP
        mp.setattr("fish_tuning.integrations.trainer_checks._accelerate_backend", lambda: "MULTI_CPU")
        with pytest.warns(UserWarning, match="did not shard the model"):
            assert _check_supported(SimpleNamespace(deepspeed=None, fsdp="full_shard"), tiny_bert()) is None
    # a trainable parameter outside candidates and always_train is named
    with pytest.raises(ValueError, match="neither a mask candidate nor always_train"):
        train(tmp_path, [ft.FishCallback(keep=0.1, num_samples=8, always_train=["nothing"])], steps=1,
              model=lora(tiny_bert(), modules_to_save=["classifier"]))


def test_attach_to_puts_fish_figures_in_front_of_reporters(tmp_path):
    seen = []

    class Reporter(TrainerCallback):  # stands for a report_to integration, which runs before user callbacks
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs or {}))

    model = lora(tiny_bert(), modules_to_save=["classifier"])
    trainer = Trainer(model=model, args=make_args(tmp_path, steps=2), train_dataset=bert_rows(),
                      callbacks=[Reporter()])
    fish = ft.FishCallback(keep=0.1, num_samples=16).attach_to(trainer)
    trainer.train()
    first = next(logs for logs in seen if logs)
    assert first["fish/kept"] == fish.mask.num_selected and first["fish/trainable"] == fish.stats["fish/trainable"]
    assert sum("fish/kept" in logs for logs in seen) == 1
