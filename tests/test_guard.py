"""One owner for the masking hooks: life of MaskGuard, and the audit's hook-lifetime defects (issue 10, items 1-3)."""

import gc
import shutil

import pytest
import torch
from transformers import Trainer, TrainerCallback

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert
from helpers import assert_only_kept_moved, snapshot
from test_trainer_callback import bert_rows, make_args


def model_and_masks():
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    fisher = ft.compute_fisher(model, cls_batches(2), num_samples=16, params=ft.peft_candidates(model),
                               progress=False)
    fisher.update({n: torch.zeros_like(p) for n, p in model.named_parameters()
                   if p.requires_grad and n not in fisher})
    mask_a = ft.select_mask(fisher, keep=0.1, always_train="classifier")
    mask_b = ft.select_mask(fisher, keep=0.1, strategy="rand", seed=3, always_train="classifier")
    return model, mask_a, mask_b


def steps(model, opt, n=3):
    model.train()
    for batch in cls_batches(n, seed=5):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("sparse", [True, False])
def test_dropped_optimizer_takes_its_hooks_along(sparse):
    """Audit item 1: A's hooks outlived A and zeroed the entries only B keeps (0 of 95 moved)."""
    model, mask_a, mask_b = model_and_masks()
    opt = ft.make_optimizer(model, mask_a, lr=1e-2, sparse=sparse)
    del opt  # no close(): garbage collection of the optimizer must remove its hooks
    before = snapshot(model)
    opt = ft.make_optimizer(model, mask_b, lr=1e-2, sparse=sparse)
    steps(model, opt)
    only_b = assert_only_kept_moved(model, mask_b, before)
    assert only_b > 0.9 * mask_b.num_selected


def test_second_guard_on_guarded_tensors_is_an_error_naming_the_first():
    model, mask_a, mask_b = model_and_masks()
    first = ft.make_optimizer(model, mask_a)
    with pytest.raises(RuntimeError, match=r"already guarded by MaskGuard\(.*owned by SparseAdamW"):
        ft.make_optimizer(model, mask_b)
    first.close()
    second = ft.make_optimizer(model, mask_b)  # free again after close()
    assert second.mask is mask_b


def test_masked_optimizer_fires_registered_step_and_state_dict_hooks():
    model, mask_a, _ = model_and_masks()
    opt = ft.MaskedOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                             mask_a, model)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("state_dict", o)))
    steps(model, opt, n=2)
    opt.state_dict()
    assert [c[0] for c in calls] == ["pre", "post", "pre", "post", "state_dict"]
    assert all(c[1] is opt for c in calls)


def test_guard_as_context_manager_detaches_on_exit_and_on_error():
    model, mask_a, _ = model_and_masks()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    with pytest.raises(KeyError):
        with ft.MaskGuard(mask_a, model, optimizer=opt) as guard:
            steps(model, opt, n=2)
            raise KeyError("boom")
    assert not guard.attached
    assert_only_kept_moved(model, mask_a, before)
    steps(model, opt, n=1)  # after the block, the plain optimizer trains everything again
    after = dict(model.named_parameters())
    name = mask_a.names[0]
    assert not torch.equal(after[name].detach()[~mask_a.bool_mask(name)], before[name][~mask_a.bool_mask(name)])


def test_foreign_optimizer_over_guarded_parameters_is_refused():
    model, mask_a, _ = model_and_masks()
    owner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    guard = ft.MaskGuard(mask_a, model).attach(owner)
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**cls_batches(1)[0]).loss.backward()
    with pytest.raises(RuntimeError, match="still guards"):
        plain.step()
    guard.close()
    plain.step()  # fine once the guard is closed
    owner.step()


def make_unwritable(folder):
    """Tests run as root, where chmod does not stop writes: a regular file in the folder's place does."""
    shutil.rmtree(folder)
    folder.write_text("not a folder")


def test_callback_checks_output_dir_before_any_work_and_leaves_no_hooks(tmp_path):
    """Audit item 2: 4 steps ran, then PermissionError at train end with the guard still attached."""
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    cb = ft.FishCallback(keep=0.1, num_samples=16)
    trainer = Trainer(model=model, args=make_args(tmp_path / "out", steps=4), train_dataset=bert_rows(),
                      callbacks=[cb])
    make_unwritable(tmp_path / "out")
    with pytest.raises(PermissionError, match="not writable"):
        trainer.train()
    assert trainer.state.global_step == 0 and cb.mask is None
    before = snapshot(model)
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    steps(model, plain, n=1)
    cand = ft.peft_candidates(model)
    moved = sum(int((dict(model.named_parameters())[n].detach() != before[n]).sum()) for n in cand)
    assert moved == sum(before[n].numel() for n in cand)  # every candidate entry trains: no mask left behind


class Boom(Exception):
    pass


def test_callback_detaches_on_an_exception_inside_train(tmp_path):
    model = lora(tiny_bert(), modules_to_save=["classifier"])

    class Fail(TrainerCallback):  # raises mid-run, after FishCallback attached its guard
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise Boom()

    cb = ft.FishCallback(keep=0.1, num_samples=16)
    trainer = Trainer(model=model, args=make_args(tmp_path, steps=4), train_dataset=bert_rows(),
                      callbacks=[cb, Fail()])
    with pytest.raises(Boom), cb:
        trainer.train()
    assert cb.guard is None
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    steps(model, plain, n=1)  # no guard left: the plain loop is neither masked nor refused

    # Without the `with` block the stale guard is loud, never silent: a foreign step is refused.
    model2 = lora(tiny_bert(), modules_to_save=["classifier"])
    cb2 = ft.FishCallback(keep=0.1, num_samples=16)
    trainer2 = Trainer(model=model2, args=make_args(tmp_path / "2", steps=4), train_dataset=bert_rows(),
                       callbacks=[cb2, Fail()])
    with pytest.raises(Boom):
        trainer2.train()
    plain2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-2)
    model2(**cls_batches(1)[0]).loss.backward()
    with pytest.raises(RuntimeError, match="still guards"):
        plain2.step()
    del trainer2, cb2  # ... and the guard goes with the Trainer's optimizer
    gc.collect()
    plain2.step()


def test_callback_exclude_keeps_excluded_candidates_frozen(tmp_path):
    """Audit item 3: exclude=r"layer\\.0\\." trained all 4 layer-0 LoRA tensors densely (128 of 128 entries)."""
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    before = snapshot(model)
    cb = ft.FishCallback(keep=0.2, num_samples=16, exclude=r"layer\.0\.")
    Trainer(model=model, args=make_args(tmp_path, steps=4), train_dataset=bert_rows(), callbacks=[cb]).train()
    layer0 = [n for n in ft.peft_candidates(model) if "layer.0." in n]
    assert len(layer0) == 4 and sorted(cb.mask.excluded) == sorted(layer0)
    after = dict(model.named_parameters())
    for n in layer0:
        assert torch.equal(after[n].detach(), before[n]), f"excluded {n} changed"
    assert_only_kept_moved(model, cb.mask, before)
    assert cb.stats["fish/trainable"] == cb.mask.num_selected + sum(
        p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)


def test_sparse_adamw_and_masked_optimizer_keep_excluded_candidates_frozen():
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    fisher = ft.compute_fisher(model, cls_batches(2), num_samples=16, params=ft.peft_candidates(model),
                               progress=False)
    mask = ft.select_mask(fisher, keep=0.2, exclude=r"layer\.0\.", always_train="classifier")
    for sparse in (True, False):
        before = snapshot(model)
        opt = ft.make_optimizer(model, mask, lr=1e-2, sparse=sparse)
        steps(model, opt)
        opt.close()
        after = dict(model.named_parameters())
        assert all(torch.equal(after[n].detach(), before[n]) for n in mask.excluded)
        assert_only_kept_moved(model, mask, before)

