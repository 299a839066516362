"""Two gloo ranks under torchrun give the single-process Fisher and mask (tests/dist_worker.py does the rank side)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import default_data_collator

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert
from helpers import ListDataset, kill_tree

FISHER_SAMPLES = 21  # odd on purpose: rank 0 scores 11 samples, rank 1 scores 10
TRAIN_SAMPLES = 16
ROOT = Path(__file__).resolve().parents[1]


def rows_of(batches):
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]


def stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def calibration_rows():
    return rows_of(cls_batches(n_batches=3, batch_size=8, seed=5))


def train_rows():
    return ListDataset(rows_of(cls_batches(n_batches=4, batch_size=8, seed=6)))


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1"}
    # --standalone: the rendezvous binds a free port itself (no race with other jobs picking ports)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_worker.py"), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # torchrun and both workers (each worker runs in its own session)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{log[-5000:]}")
    assert proc.returncode == 0, f"torchrun failed:\n{log[-8000:]}"
    return out


@pytest.mark.slow  # one torchrun launch (~20 s on 2 cores) shared with the next test
def test_compute_fisher_two_ranks_equals_one_process(torchrun_out):
    ranks = [load_file(torchrun_out / f"fisher_rank{r}.safetensors") for r in range(2)]
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0]), "ranks disagree"  # bit-identical
    model = lora(tiny_bert())
    rows = calibration_rows()
    batches = [stack(rows[i: i + 4]) for i in range(0, len(rows), 4)]
    single = ft.compute_fisher(model, batches, num_samples=FISHER_SAMPLES, progress=False)
    assert set(single) == set(ranks[0])
    for n, s in single.items():
        torch.testing.assert_close(ranks[0][n], s, rtol=1e-5, atol=1e-9)
    a, b = ft.select_mask(ranks[0], keep=0.1), ft.select_mask(single, keep=0.1)
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.names)
    # 20 of the 21 samples give a different Fisher: the 21st sample (rank 0's 11th) really was scored
    fewer = ft.compute_fisher(model, batches, num_samples=FISHER_SAMPLES - 1, progress=False)
    assert any(not torch.allclose(fewer[n], s) for n, s in single.items())


@pytest.mark.slow
def test_callback_under_ddp_same_mask_as_single_process(torchrun_out):
    masks = [ft.FishMask.load(torchrun_out / f"mask_rank{r}.safetensors") for r in range(2)]
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    loader = ft.calibration_loader(train_rows(), TRAIN_SAMPLES, batch_size=4, collate_fn=default_data_collator,
                                   seed=0, distributed=False)
    fisher = ft.compute_fisher(model, loader, num_samples=TRAIN_SAMPLES, params=ft.peft_candidates(model),
                               progress=False)
    single = ft.select_mask(fisher, keep=0.1)
    for mask in masks:
        assert all(torch.equal(mask.indices[n], single.indices[n]) for n in single.names)

    weights = [load_file(torchrun_out / f"weights_rank{r}.safetensors") for r in range(2)]
    assert int(weights[0]["world"]) == 2 and int(weights[0]["ddp"]) == 1, "the Trainer did not run DDP"
    for w in weights:  # the masked gradient is zero after DDP's all-reduce, so clipping saw Eq. 6
        assert int(w["grads_checked"]) > 0 and int(w["masked_grad_nonzero"]) == 0
    for name in single.names:
        keep = single.bool_mask(name)
        before, after = weights[0][f"before.{name}"], weights[0][f"after.{name}"]
        assert torch.equal(after[~keep], before[~keep]), f"masked entries of {name} moved under DDP"
        assert torch.equal(after, weights[1][f"after.{name}"]), "DDP ranks ended with different weights"
    moved = sum(int((weights[0][f"after.{n}"] != weights[0][f"before.{n}"]).sum()) for n in single.names)
    assert moved > 0.9 * single.num_selected


def test_masks_that_differ_between_ddp_ranks_are_refused_on_every_rank(torchrun_out):
    for r in range(2):  # replicas would otherwise zero and restore different entries, and silently diverge
        assert "differs between ranks" in (torchrun_out / f"own_mask_rank{r}.txt").read_text()


def test_distributed_true_without_process_group_is_a_clear_error():
    with pytest.raises(ValueError, match="init_process_group"):
        ft.compute_fisher(lora(tiny_bert()), cls_batches(1), num_samples=4, distributed=True, progress=False)
