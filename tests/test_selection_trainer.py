"""FishCallback with an allocation, a score beyond Fisher, and a dense warm-up followed by a rewind."""

import pytest
import torch
from transformers import Trainer, TrainerCallback

import fish_tuning as ft
from conftest import lora, tiny_bert
from fish_tuning import scores as sc
from fish_tuning.fisher import gradient_moments
from helpers import assert_only_kept_moved, snapshot
from test_trainer_callback import bert_rows, make_args


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _model():
    return lora(tiny_bert(), modules_to_save=["classifier"])


def _reference_mask(tmp_path, dense_steps, **select):
    """Brute force: a plain Trainer run stopped after ``dense_steps`` (same schedule), then moments and selection."""
    model = _model()
    trainer = Trainer(model=model, args=make_args(tmp_path / "ref", 6), train_dataset=bert_rows(),
                      callbacks=[StopAt(dense_steps)] if dense_steps else [])
    if dense_steps:
        trainer.train()
    loader = ft.calibration_loader(trainer.train_dataset, 16, batch_size=4, collate_fn=trainer.data_collator, seed=0)
    moments = gradient_moments(model, loader, num_samples=16, params=ft.peft_candidates(model), progress=False)
    return ft.select_mask(sc.score(moments, select.pop("score")), seed=0, **select)


def test_allocation_and_score_reach_the_trainer_mask(tmp_path):
    expected = _reference_mask(tmp_path, 0, keep=0.1, score="normalized", allocation="uniform")
    cb = ft.FishCallback(keep=0.1, num_samples=16, allocation="uniform", score="normalized")
    trainer = Trainer(model=_model(), args=make_args(tmp_path / "a", 2), train_dataset=bert_rows(), callbacks=[cb])
    trainer.train()
    assert cb.mask.fingerprint() == expected.fingerprint() and cb.mask.meta["allocation"] == "uniform"
    assert cb.mask.meta["fish_config"]["score"] == "normalized"
    # the shuffled control through the callback: the FISH mask's counts, random positions
    shuffled = ft.FishCallback(strategy="rand", allocation=expected, num_samples=16)
    Trainer(model=_model(), args=make_args(tmp_path / "b", 1), train_dataset=bert_rows(),
            callbacks=[shuffled]).train()
    assert {n: i.numel() for n, i in shuffled.mask.indices.items()} == {n: i.numel() for n, i in
                                                                        expected.indices.items()}
    assert shuffled.mask.fingerprint() != expected.fingerprint()


def test_warmup_scores_after_dense_steps_then_rewinds_to_init(tmp_path):
    expected = _reference_mask(tmp_path, 2, keep=0.1, score="consistency", allocation="uniform")
    model = _model()
    init = snapshot(model)
    cb = ft.FishCallback(keep=0.1, num_samples=16, allocation="uniform", score="consistency", warmup_steps=2)
    trainer = Trainer(model=model, args=make_args(tmp_path / "w", 6), train_dataset=bert_rows(), callbacks=[cb])
    trainer.train()
    assert cb.source == "fisher" and cb.mask.fingerprint() == expected.fingerprint()
    # rewound: every never-kept entry is bit-identical to its value at step 0, though all of them trained densely
    assert assert_only_kept_moved(model, cb.mask, init) > 0
    # a fresh optimizer state at the rewind: 4 masked steps after the 2 dense ones
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    steps = {int(s["step"]) for s in opt.state.values() if "step" in s}
    assert steps == {4}


def test_warmup_resume_inside_is_refused_and_short_runs_warn(tmp_path):
    cb = ft.FishCallback(keep=0.1, num_samples=16, warmup_steps=3)
    Trainer(model=_model(), args=make_args(tmp_path / "r", 4, save_strategy="steps", save_steps=1),
            train_dataset=bert_rows(), callbacks=[cb]).train()
    again = ft.FishCallback(keep=0.1, num_samples=16, warmup_steps=3)
    trainer = Trainer(model=_model(), args=make_args(tmp_path / "r", 4), train_dataset=bert_rows(), callbacks=[again])
    with pytest.raises(ValueError, match="inside the warm-up"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "r" / "checkpoint-2"))
    model = _model()
    before = snapshot(model)
    short = ft.FishCallback(keep=0.1, num_samples=16, warmup_steps=5)
    with pytest.warns(UserWarning, match="inside the warm-up"):
        Trainer(model=model, args=make_args(tmp_path / "s", 2), train_dataset=bert_rows(), callbacks=[short]).train()
    assert short.mask is None and not torch.equal(before[ft.peft_candidates(model)[0]],
                                                  model.get_parameter(ft.peft_candidates(model)[0]))


def test_refresh_in_the_trainer_moves_the_mask_and_resumes_bit_identically(tmp_path):
    from test_trainer_callback import StopAt as Stop
    from test_trainer_callback import train

    def fish():
        return ft.FishCallback(keep=0.1, num_samples=16, refresh_every=2, refresh_fraction=0.5, refresh_until=8)

    full_cb = fish()
    model = _model()
    init = snapshot(model)
    full = train(tmp_path / "full", [full_cb], steps=8, model=model)
    history = full_cb.mask.meta["refresh"]["history"]
    assert [h["step"] for h in history] == [2, 4, 6] and all(h["regrown"] > 0 for h in history)
    logged = [e for e in full.state.log_history if "fish/refresh_changed" in e]
    assert [e["step"] for e in logged] == [2, 4, 6] and 0 < logged[-1]["fish/ever_kept"] < 1
    saved = ft.FishMask.load(tmp_path / "full" / ft.FishMask.FILE_NAME)
    assert saved.fingerprint() == full_cb.mask.fingerprint()  # the train-end file: the mask in force at the end
    assert saved.num_selected == round(0.1 * saved.num_candidates)
    # the budget does not leak: no more entries moved than were ever kept (first mask + regrowth)
    moved = sum(int((model.get_parameter(n).detach() != init[n]).sum()) for n in saved.names)
    assert saved.num_selected < moved <= saved.meta["refresh"]["ever_kept"] * saved.num_candidates

    # resume inside a gradient window (checkpoint 3; the refresh at 4 scores steps 3 and 4)
    train(tmp_path / "cut", [fish(), Stop(3)], steps=8, save_strategy="steps", save_steps=3)
    in_ckpt = ft.FishMask.load(tmp_path / "cut" / "checkpoint-3" / ft.FishMask.FILE_NAME)
    assert [h["step"] for h in in_ckpt.meta["refresh"]["history"]] == [2]  # the mask in force at step 3
    second = fish()
    resumed = train(tmp_path / "resumed", [second], steps=8, resume=str(tmp_path / "cut" / "checkpoint-3"))
    assert second.mask.fingerprint() == full_cb.mask.fingerprint()
    a, b = snapshot(full.model), snapshot(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a), "resumed run differs from the uninterrupted one"


def test_a_given_mask_moves_under_refresh_and_a_dropped_optimizer_takes_the_refresh_along(tmp_path):
    import gc

    given = _reference_mask(tmp_path, 0, keep=0.1, score="fisher", allocation="global", always_train="classifier")
    cb = ft.FishCallback(mask=given, refresh_every=2, refresh_fraction=0.5)
    trainer = Trainer(model=_model(), args=make_args(tmp_path / "g", 4), train_dataset=bert_rows(), callbacks=[cb])
    trainer.train()
    assert cb.source == "given" and cb.mask.fingerprint() != given.fingerprint()
    assert {n: i.numel() for n, i in cb.mask.indices.items()} == {n: i.numel() for n, i in given.indices.items()}
    # plain loop: dropping the optimizer drops its refresher's hooks with its guard
    model, mask = _model(), given
    cands = [model.get_parameter(n) for n in mask.names]
    opt = ft.SparseAdamW(cands, mask, lr=1e-2, model=model, refresh=ft.refresh.RefreshSchedule(every=2))
    guard = opt.refresher.guard
    del opt
    gc.collect()
    assert not guard.attached or not guard._handles
    again = ft.MaskedOptimizer(torch.optim.AdamW(cands), mask, model)  # the tensors are free for a new optimizer
    assert again.refresher is None
