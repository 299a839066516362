"""Audit of sharded paths the main sharded tests leave out (FSDP2, ZeRO-3 with CPU offload, ZeRO-2; 2 gloo ranks).

One Trainer run per engine (tests/sharded_audit_worker.py) combines: a mask selected in one process and passed as
FishCallback(mask=...); gradient_accumulation_steps=2; clipping at 0.01; weight decay 0.1; candidates that shard
unevenly (lm_head lora_B 65 x 3 = 195 entries, v_proj lora_A [1, 32] with fewer rows than ranks); save_model.
Checked: masked entries bit-identical on every rank and in the saved adapter, every kept entry moves, weights
match one process over the same global batches. Also: resuming a 2-rank checkpoint on 1 rank (FSDP2: works,
same weights; ZeRO-3: refused by DeepSpeed with a clear error).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import default_data_collator

import fish_tuning as ft
from helpers import HANG_GUARD_S
from sharded_audit_worker import audit_model, trainer_for
from sharded_trainer import WEIGHT_ATOL, launch, train_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def given(tmp_path_factory):
    """The mask selected in one process, the initial weights and the 1-process run's weights (batch 8)."""
    model = audit_model()
    loader = ft.calibration_loader(train_rows(), 13, batch_size=4, collate_fn=default_data_collator, seed=0,
                                   distributed=False)
    scores = ft.compute_fisher(model, loader, num_samples=13, params=ft.peft_candidates(model), progress=False)
    mask = ft.select_mask(scores, keep=0.1)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trainer_for(str(tmp_path_factory.mktemp("single")), None, mask, batch=8, accum=1)
    trainer.train()
    return {"mask": mask, "init": init, "after": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}


def run(engine: str, out, given, mode: str = "train", nproc: int = 2, timeout: float = HANG_GUARD_S):
    given["mask"].save(out / "given_mask.safetensors")
    return launch("sharded_audit_worker.py", engine, str(out), mode, timeout=timeout, nproc=nproc)[:2]


def check(out, engine: str, given, mode: str = "train", ranks: int = 2) -> float:
    mask, init = given["mask"], given["init"]
    w = [load_file(out / f"{engine}_{mode}_rank{r}.safetensors") for r in range(ranks)]
    saved = load_file(out / engine / f"final_{mode}" / "adapter_model.safetensors")
    worst, moved = 0.0, 0
    for n in mask.names:
        keep, after = mask.bool_mask(n), w[0][f"after.{n}"]
        assert all(torch.equal(after, x[f"after.{n}"]) for x in w), f"ranks gathered different {n}"
        assert torch.equal(after[~keep], init[n][~keep]), f"{engine}: masked entries of {n} moved"
        assert torch.equal(saved[n.replace(".default", "")], after), f"{engine}: saved {n} is not the trained one"
        moved += int((after[keep] != init[n][keep]).sum())
        worst = max(worst, float((after - given["after"][n]).abs().max()))
    assert moved == mask.num_selected
    assert worst <= WEIGHT_ATOL, f"{engine}: max |sharded - 1 process| = {worst:.2e}"
    return worst


@pytest.mark.parametrize("engine", ["zero3", "zero2"])
def test_zero_given_mask_accumulation_uneven_partitions(engine, tmp_path, given):
    code, log = run(engine, tmp_path, given)
    assert code == 0, f"torchrun failed:\n{log[-6000:]}"
    print(f"max |{engine} - 1 process| = {check(tmp_path, engine, given):.2e}")


def test_fsdp2_given_mask_accumulation_uneven_shards_and_resume_on_one_rank(tmp_path, given):
    code, log = run("fsdp2", tmp_path, given)
    assert code == 0, f"torchrun failed:\n{log[-6000:]}"
    check(tmp_path, "fsdp2", given)
    # the 2-rank checkpoint-1 resumed on 1 rank (DCP reshards; the mask comes back from the scheduler state)
    code, log = run("fsdp2", tmp_path, given, mode="resume", nproc=1)
    assert code == 0, f"resume on 1 rank failed:\n{log[-6000:]}"
    check(tmp_path, "fsdp2", given, mode="resume", ranks=1)


def test_zero3_resume_on_another_world_size_is_refused(tmp_path, given):
    code, log = run("zero3", tmp_path, given)
    assert code == 0, f"torchrun failed:\n{log[-6000:]}"
    code, log = run("zero3", tmp_path, given, mode="resume", nproc=1)
    assert code != 0 and "DP world size of 2 but the current world size is 1" in log, log[-4000:]
