"""Two gloo ranks under torchrun give the single-process Fisher and mask (tests/dist_worker.py does the rank side)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import default_data_collator

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert
from helpers import HANG_GUARD_S, ListDataset

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
    from sharded_trainer import launch  # late: sharded_trainer imports the FSDP test's builders

    out = tmp_path_factory.mktemp("dist")
    code, log, _ = launch("dist_worker.py", str(out), timeout=HANG_GUARD_S)  # --standalone: a free port, no race
    if code is None:
        pytest.fail(f"torchrun timed out (process group killed):\n{log[-5000:]}")
    assert code == 0, f"torchrun failed:\n{log[-8000:]}"
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


@pytest.mark.slow
def test_refresh_under_ddp_moves_the_mask_identically_on_every_rank(torchrun_out):
    masks = [ft.FishMask.load(torchrun_out / f"moving_mask_rank{r}.safetensors") for r in range(2)]
    assert masks[0].fingerprint() == masks[1].fingerprint()
    assert [h["step"] for h in masks[0].meta["refresh"]["history"]] == [2, 4, 6]
    assert all(h["regrown"] > 0 for h in masks[0].meta["refresh"]["history"])
    weights = [load_file(torchrun_out / f"moving_weights_rank{r}.safetensors") for r in range(2)]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0]), "DDP ranks diverged"


def test_masks_that_differ_between_ddp_ranks_are_refused_on_every_rank(torchrun_out):
    for r in range(2):  # replicas would otherwise zero and restore different entries, and silently diverge
        assert "differs between ranks" in (torchrun_out / f"own_mask_rank{r}.txt").read_text()


def test_distributed_true_without_process_group_is_a_clear_error():
    with pytest.raises(ValueError, match="init_process_group"):
        ft.compute_fisher(lora(tiny_bert()), cls_batches(1), num_samples=4, distributed=True, progress=False)


def test_launch_retries_a_gloo_abort_once_and_nothing_else(monkeypatch):
    import sharded_trainer

    calls = []

    def fake(results):
        def once(script, *argv, timeout, nproc):
            calls.append(script)
            return results[len(calls) - 1]
        return once

    abort = (-6, f"rank 0: {sharded_trainer.GLOO_ABORT}", 1.0)
    monkeypatch.setattr(sharded_trainer, "_launch_once", fake([abort, (0, "ok", 2.0)]))
    code, log, seconds = sharded_trainer.launch("w.py", timeout=1)
    assert (code, seconds, len(calls)) == (0, 3.0, 2) and "retried once" in log and log.endswith("ok")
    for first in ([abort, abort], [(1, "AssertionError: ranks disagree", 1.0), (0, "ok", 1.0)]):
        calls.clear()  # a second abort, or any other failure: returned as is (a real defect is never retried away)
        monkeypatch.setattr(sharded_trainer, "_launch_once", fake(first))
        code, _, _ = sharded_trainer.launch("w.py", timeout=1)
        assert code != 0 and len(calls) == (2 if first[0] is abort else 1)
