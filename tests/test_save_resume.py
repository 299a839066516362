"""The mask beside an adapter / checkpoint is the one that trained it: save_only_model resume, a second train(),
save_adapter over another format or under a named adapter, the train-end mask, and fish-tune train's save."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert
from helpers import ListDataset, assert_only_kept_moved, snapshot


def bert_rows(n_batches=4, batch_size=8):
    return ListDataset([{k: v[i] for k, v in b.items()} for b in cls_batches(n_batches, batch_size)
                        for i in range(batch_size)])


def make_args(out, steps=4, **kw):
    base = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                weight_decay=0.1, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = control.should_save = True


def run(out, callbacks, steps=4, model=None, resume=None, **kw):
    model = model if model is not None else lora(tiny_bert(), modules_to_save=["classifier"])
    trainer = Trainer(model=model, args=make_args(out, steps, **kw), train_dataset=bert_rows(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer


def rand_fish(seed):
    return ft.FishCallback(keep=0.1, num_samples=16, strategy="rand", seed=seed)


# ---------------------------------------------------------------- defect 1: save_only_model resume
def test_save_only_model_resume_uses_the_resumed_checkpoints_mask(tmp_path):
    kw = dict(save_strategy="steps", save_steps=2, save_only_model=True)
    a = rand_fish(1)
    run(tmp_path / "A", [a, StopAt(2)], **kw)
    b = rand_fish(2)  # another run with another mask, and a checkpoint-2 of its own
    run(tmp_path / "B", [b, StopAt(2)], **kw)
    ckpt = tmp_path / "A" / "checkpoint-2"
    assert not (ckpt / "optimizer.pt").exists() and a.mask.fingerprint() != b.mask.fingerprint()

    # resumed into B's output_dir: A's mask (not B's checkpoint-2), and nothing outside it moves
    init = snapshot(lora(tiny_bert(), modules_to_save=["classifier"]))
    into_b = rand_fish(1)
    trainer = run(tmp_path / "B", [into_b], resume=ckpt, **kw)
    assert into_b.source == "checkpoint" and into_b.mask.fingerprint() == a.mask.fingerprint()
    assert_only_kept_moved(trainer.model, a.mask, init)
    # resumed into an empty output_dir: found, no false FileNotFoundError
    into_c = rand_fish(1)
    run(tmp_path / "C", [into_c], resume=ckpt, **kw)
    assert into_c.mask.fingerprint() == a.mask.fingerprint()

    # a mask other than the checkpoint's recorded one is refused, even without optimizer state
    with pytest.raises(ValueError, match="not the interrupted run's"):
        run(tmp_path / "D", [ft.FishCallback(mask=b.mask)], resume=ckpt, **kw)
    # a copy whose original is gone: refused with the fix named; the fix works
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    shutil.rmtree(tmp_path / "A")
    with pytest.raises(FileNotFoundError, match=r"FishMask\.load\('<checkpoint>/fish_mask\.safetensors'\)"):
        run(tmp_path / "E", [rand_fish(1)], resume=moved, **kw)
    given = ft.FishCallback(mask=ft.FishMask.load(moved / ft.FishMask.FILE_NAME))
    run(tmp_path / "E", [given], resume=moved, **kw)
    assert given.mask.fingerprint() == a.mask.fingerprint()
    # nothing identifies the mask (no optimizer state, no record): refused, never guessed from output_dir
    state_file = moved / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["stateful_callbacks"].pop("FishCallbackMask")
    state_file.write_text(json.dumps(state))
    with pytest.raises(FileNotFoundError, match="nothing identifies"):
        run(tmp_path / "B", [rand_fish(1)], resume=moved, **kw)


# ---------------------------------------------------------------- defect 2: train() twice
def test_second_train_keeps_the_first_mask(tmp_path):
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    init = snapshot(model)
    cb = ft.FishCallback(keep=0.1, num_samples=16)
    trainer = Trainer(model=model, args=make_args(tmp_path, 3), train_dataset=bert_rows(), callbacks=[cb])
    trainer.train()
    first = cb.mask
    with pytest.warns(UserWarning, match="keeping the mask"):
        trainer.train()
    assert cb.source == "kept" and cb.mask.fingerprint() == first.fingerprint()
    assert assert_only_kept_moved(model, first, init) > 0  # over both runs: only the first mask's entries moved
    assert ft.FishMask.load(tmp_path / ft.FishMask.FILE_NAME).fingerprint() == first.fingerprint()
    cb.reset()  # an explicit fresh selection
    Trainer(model=model, args=make_args(tmp_path, 1), train_dataset=bert_rows(), callbacks=[cb]).train()
    assert cb.source == "fisher"


# ---------------------------------------------------------------- defect 3: save_adapter over the other format
def test_save_adapter_removes_the_other_format_and_load_refuses_unrecorded_weights(tmp_path):
    model = lora(tiny_bert())
    scores = {n: torch.rand(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    mask = ft.select_mask(scores, keep=0.1, always_train="classifier")
    ft.save_adapter(model, mask, tmp_path)
    stale = (tmp_path / "adapter_model.safetensors").read_bytes()
    opt = ft.make_optimizer(model, mask, lr=0.1)
    for batch in cls_batches(2, 8):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = snapshot(model)
    ft.save_adapter(model, mask, tmp_path, safe_serialization=False)
    assert not (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_model.bin").is_file()
    loaded, _ = ft.load_adapter(tiny_bert(), tmp_path)
    got = snapshot(loaded)
    assert all(torch.equal(trained[n], got[n]) for n in mask.names)
    # a weight file beside the recorded ones that the mask does not know: refused
    (tmp_path / "adapter_model.safetensors").write_bytes(stale)
    with pytest.raises(ValueError, match="was not saved with"):
        ft.load_adapter(tiny_bert(), tmp_path)


# ---------------------------------------------------------------- defect 4: the train-end mask
def test_train_end_mask_refuses_the_older_adapter_in_output_dir(tmp_path):
    first = run(tmp_path, [rand_fish(1)], steps=2)
    first.save_model(str(tmp_path))
    second_cb = rand_fish(2)
    second = run(tmp_path, [second_cb], steps=2)  # "killed" before save_model: an older adapter beside the mask
    with pytest.raises(ValueError, match="older than the fish_mask"):
        ft.load_adapter(tiny_bert(), tmp_path)
    second.save_model(str(tmp_path))
    _, mask = ft.load_adapter(tiny_bert(), tmp_path)
    assert mask.fingerprint() == second_cb.mask.fingerprint()


def test_cli_train_records_the_saved_adapter_and_one_line_for_floating_point_errors(tmp_path, capsys,
                                                                                     monkeypatch):
    from fish_tuning.cli import main
    from fish_tuning.commands import train as train_cmd
    from test_cli_train import FAST, save_tiny_models, write_sentiment_csv

    models = save_tiny_models(tmp_path)
    csv = write_sentiment_csv(tmp_path / "train.csv")
    out = tmp_path / "run"
    rc = main(["train", "--model_name_or_path", str(models["bert"]), "--train_file", str(csv), "--keep", "0.1",
               "--output_dir", str(out), *FAST])
    assert rc == 0
    mask = ft.FishMask.load(out / ft.FishMask.FILE_NAME)
    assert set(mask.meta["adapter_files"]) == {"adapter_model.safetensors"}  # written after save_model

    def diverge(argv):
        raise FloatingPointError("non-finite (NaN/inf) gradient for parameter 'w': lower the learning rate")

    monkeypatch.setattr(train_cmd, "run", diverge)
    capsys.readouterr()
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fish-tune: error: non-finite (NaN/inf) gradient for parameter 'w': lower the learning rate"]


# ---------------------------------------------------------------- defect 5: a named adapter
def test_save_adapter_named_adapter_round_trip(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="pissa",
                     task_type="SEQ_CLS")
    model = get_peft_model(tiny_bert(), cfg, adapter_name="sst2")
    scores = {n: torch.rand(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    mask = ft.select_mask(scores, keep=0.1, always_train="classifier")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    path = ft.save_adapter(model, mask, tmp_path / "ad")
    assert path == os.path.join(tmp_path / "ad", "sst2", ft.FishMask.FILE_NAME)
    assert (tmp_path / "ad" / "sst2" / "adapter_model.safetensors").is_file()
    want = snapshot(model)
    for folder in (tmp_path / "ad", tmp_path / "ad" / "sst2"):
        loaded, got = ft.load_adapter(tiny_bert(), folder, adapter_name="sst2")
        assert got.fingerprint() == mask.fingerprint()
        have = snapshot(loaded)
        assert all(torch.equal(want[n], have[n]) for n in mask.names)
