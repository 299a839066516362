"""FishCallback under DeepSpeed ZeRO-3 with CPU optimizer offload: 2 gloo ranks under torchrun vs one process.

tests/deepspeed_worker.py does the rank side; this file runs it and a plain 1-process Trainer over the same global
batches. Skipped when deepspeed is not installed (``pip install 'fish-tuning[deepspeed]'``; ``make test`` does).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import fish_tuning as ft
from conftest import lm_batches
from helpers import ListDataset, kill_tree
from test_fsdp import llama_lora

pytest.importorskip("deepspeed")

FISHER_SAMPLES = 13  # odd on purpose: rank 0 scores 7 samples, rank 1 scores 6
KEEP = 0.1
STEPS = 3
# Small enough that clipping acts at every step: the weights then match one process only if ZeRO's gradient norm
# is the norm of the *masked* gradient (the guard's hook runs before ZeRO's reduce-scatter).
CLIP = 0.01
ROOT = Path(__file__).resolve().parents[1]
# Gathered weights after STEPS steps, ZeRO-3 (2 ranks, DeepSpeedCPUAdam on the offloaded fp32 master) vs 1 process
# (torch AdamW). Same global-batch mean gradient, but ZeRO averages two half-batch gradients after a
# reduce-scatter and clips with its own norm, and CPU Adam is a separate C++ kernel: float32 rounding differs at
# ~1e-7 relative. Adam normalises the update (lr * m / sqrt(v), |update| ~ lr whatever the gradient's scale), so a
# relative error e in the gradient or the arithmetic moves a weight by ~lr * e per step: 3 steps * 1e-2 * a few
# 1e-6 stays well below 1e-6.
WEIGHT_ATOL = 1e-6


def ds_config() -> dict:
    """configs/ds_zero3_offload.json, with parameter persistence off so that even the tiny LoRA tensors are
    partitioned (the case FISH must handle; real LoRA tensors can exceed the threshold)."""
    import json

    cfg = json.loads((ROOT / "configs" / "ds_zero3_offload.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return cfg


def train_rows():
    """STEPS global batches of 8; every row has the same number of label tokens, so each rank's token-mean loss
    averaged over the 2 ranks is the global token mean (what one process computes)."""
    rows = []
    for b in lm_batches(n_batches=STEPS, batch_size=8, seed=7):
        b["labels"] = b["input_ids"].clone()
        b["labels"][:, :4] = -100
        rows += [{k: v[i] for k, v in b.items()} for i in range(8)]
    return ListDataset(rows)


def make_trainer(out, rows, *callbacks, deepspeed=None, save=False, batch=4) -> Trainer:
    """The same Trainer for the ZeRO-3 ranks (batch 4 each) and the 1-process reference (batch 8)."""
    args = TrainingArguments(
        output_dir=str(out), deepspeed=deepspeed, max_steps=STEPS, per_device_train_batch_size=batch,
        learning_rate=1e-2, weight_decay=0.1, max_grad_norm=CLIP, optim="adamw_torch",
        save_strategy="steps" if save else "no", save_steps=1, report_to=[], seed=0, disable_tqdm=True,
        logging_steps=1, use_cpu=deepspeed is None,
        accelerator_config={"use_configured_state": True} if deepspeed else None)
    return Trainer(model=llama_lora(), args=args, train_dataset=rows, callbacks=list(callbacks))


def run_torchrun(out: Path, mode: str, timeout: float) -> tuple[int | None, str, float]:
    """(return code or None on timeout, log, seconds). On timeout the launcher and every worker are killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "deepspeed_worker.py"), str(out), mode]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        log, _ = proc.communicate(timeout=30)
        code = None
    return code, log, time.monotonic() - t0


@pytest.fixture(scope="module")
def zero3_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    code, log, _ = run_torchrun(out, "train", timeout=500)
    if code is None:
        pytest.fail(f"torchrun timed out (all processes killed):\n{log[-5000:]}")
    assert code == 0, f"torchrun failed:\n{log[-8000:]}"
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The 1-process reference: scores, mask and weights before/after a plain Trainer run with FishCallback."""
    out = tmp_path_factory.mktemp("single")
    fish = ft.FishCallback(keep=KEEP, num_samples=FISHER_SAMPLES)
    trainer = make_trainer(out, train_rows(), fish, batch=8)
    model = trainer.model
    loader = ft.calibration_loader(train_rows(), FISHER_SAMPLES, batch_size=4,
                                   collate_fn=trainer.data_collator, seed=0, distributed=False)
    scores = ft.compute_fisher(model, loader, num_samples=FISHER_SAMPLES, params=ft.peft_candidates(model),
                               progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in scores}
    trainer.train()
    after = {n: p.detach().clone() for n, p in model.named_parameters() if n in scores}
    return {"scores": scores, "mask": fish.mask, "before": before, "after": after}


@pytest.mark.slow  # one torchrun launch (two ZeRO-3 runs) shared by this file's tests
def test_zero3_fisher_and_mask_equal_one_process(zero3_out, single):
    ranks = [load_file(zero3_out / f"fisher_rank{r}.safetensors") for r in range(2)]
    for n, s in single["scores"].items():
        assert torch.equal(ranks[0][n], ranks[1][n]), f"ranks disagree on {n}"
        assert ranks[0][n].shape == s.shape  # full-size: the hooks saw gathered weights, not partitions
        torch.testing.assert_close(ranks[0][n], s, rtol=1e-5, atol=1e-9)
    ref = single["mask"]
    for r in range(2):
        mask = ft.FishMask.load(zero3_out / f"full_mask_rank{r}.safetensors")
        assert mask.num_selected == ref.num_selected
        assert all(torch.equal(mask.indices[n], ref.indices[n]) for n in ref.names), f"rank {r}: another mask"


@pytest.mark.slow
def test_zero3_masked_training_matches_one_process(zero3_out, single):
    ref = single["mask"]
    w = [load_file(zero3_out / f"full_rank{r}.safetensors") for r in range(2)]
    assert int(w[0]["world"]) == 2
    for r in range(2):  # at every step, the reduced fp32 gradient of each masked entry was already zero
        assert int(w[r]["checked"]) == STEPS * len(ref.names) and int(w[r]["masked_grad_nonzero"]) == 0
    worst = 0.0
    for name in ref.names:
        keep = ref.bool_mask(name)
        before, after = w[0][f"before.{name}"], w[0][f"after.{name}"]
        assert torch.equal(before, single["before"][name]), "not the same initial adapter"
        assert torch.equal(after, w[1][f"after.{name}"]), "ranks gathered different weights"
        assert torch.equal(after[~keep], before[~keep]), f"masked entries of {name} moved under ZeRO-3"
        worst = max(worst, float((after - single["after"][name]).abs().max()))
        torch.testing.assert_close(after, single["after"][name], rtol=0, atol=WEIGHT_ATOL)
    moved = sum(int((w[0][f"after.{n}"] != w[0][f"before.{n}"]).sum()) for n in ref.names)
    assert moved > 0.9 * ref.num_selected
    print(f"max |ZeRO-3 - 1 process| = {worst:.2e}")


@pytest.mark.slow
def test_zero3_resume_from_checkpoint_equals_uninterrupted(zero3_out, single):
    full = load_file(zero3_out / "full_rank0.safetensors")
    for r in range(2):
        resumed = load_file(zero3_out / f"resumed_rank{r}.safetensors")
        assert int(resumed["from_checkpoint"]) == 1, "the resumed run did not take the checkpoint's mask"
        for name in single["mask"].names:  # same ops on the same partitions: bit for bit
            assert torch.equal(resumed[f"after.{name}"], full[f"after.{name}"]), f"{name} differs after resume"
    # one consolidated mask file per checkpoint (written by rank 0), the 1-process mask
    for step in range(1, STEPS + 1):
        ckpt = zero3_out / "full" / f"checkpoint-{step}"
        mask = ft.FishMask.load(ckpt / ft.FISH_MASK_NAME)
        assert all(torch.equal(mask.indices[n], single["mask"].indices[n]) for n in single["mask"].names)
        assert not list(ckpt.glob("fish_mask*rank*"))
    assert (zero3_out / "full" / ft.FISH_MASK_NAME).exists()


@pytest.mark.slow
def test_zero3_dead_worker_fails_in_bounded_time(tmp_path):
    code, log, seconds = run_torchrun(tmp_path, "die", timeout=240)
    assert code is not None and code != 0, f"a run whose rank 1 dies must fail, not hang:\n{log[-3000:]}"
    assert seconds < 240, f"took {seconds:.0f} s"
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"worker processes survived: {left}"
