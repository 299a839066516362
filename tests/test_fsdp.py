"""FISH on an FSDP2-sharded model (``fully_shard``), 2 gloo ranks under torchrun vs one process.

tests/fsdp_worker.py does the rank side; this file runs it and recomputes everything in one unsharded process.
"""

from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import fish_tuning as ft
from conftest import lm_batches, lora, tiny_llama
from helpers import HANG_GUARD_S

FISHER_SAMPLES = 13  # odd on purpose: rank 0 scores 7 samples in 2 batches, rank 1 scores 6
KEEP = 0.1
STEPS = 3
OPT = {"lr": 1e-2, "weight_decay": 0.1}
ROOT = Path(__file__).resolve().parents[1]
# Gathered weights after STEPS AdamW steps, 2 FSDP ranks vs 1 process. Both compute the same global-batch mean
# gradient, but FSDP sums two half-batch gradients (reduce-scatter, then / 2) where one process sums one batch:
# float32 rounding differs at ~1e-7 relative. Adam divides by sqrt(v) ~ |g|, so an update is lr * O(1) whatever
# the gradient's scale, and a relative gradient error e moves it by ~lr * e: 3 steps * 1e-2 * (a few 1e-6
# where |g| is tiny) stays far below 1e-6. Measured: 1.5e-8 (both optimizers, r=3).
WEIGHT_ATOL = 1e-6


def llama_lora():
    """Tiny Llama + LoRA (PiSSA), built on one thread as in the workers: PiSSA's SVD differs in the last bit with
    the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # r=3: lora_A is [3, 32], sharded unevenly (rows 0-1 on rank 0, row 2 on rank 1)
        return lora(tiny_llama(), targets=("q_proj", "v_proj"), task="CAUSAL_LM", r=3)
    finally:
        torch.set_num_threads(threads)


def stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def calibration_rows():
    return [{k: v[i] for k, v in b.items()} for b in lm_batches(n_batches=2, batch_size=8, seed=5)
            for i in range(8)]


def train_batches():
    return lm_batches(n_batches=STEPS, batch_size=8, seed=7)


def token_loss(model, batch):
    """Sum of next-token NLL over the labelled tokens (the caller divides by the global token count)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")


def run_torchrun(out: Path, mode: str, timeout: float) -> tuple[int | None, str, float]:
    """tests/fsdp_worker.py on 2 ranks: (return code or None on timeout, log, seconds); killed whole on timeout."""
    from sharded_trainer import launch  # late: sharded_trainer imports this module's builders

    return launch("fsdp_worker.py", str(out), mode, timeout=timeout)


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    code, log, _ = run_torchrun(out, "train", timeout=HANG_GUARD_S)
    if code is None:
        pytest.fail(f"torchrun timed out (process group killed):\n{log[-5000:]}")
    assert code == 0, f"torchrun failed:\n{log[-8000:]}"
    return out


@pytest.fixture(scope="module")
def single_fisher():
    model = llama_lora()
    rows = calibration_rows()
    batches = [stack(rows[i: i + 4]) for i in range(0, len(rows), 4)]
    return ft.compute_fisher(model, batches, num_samples=FISHER_SAMPLES, progress=False)


@pytest.mark.slow  # one torchrun launch shared by this file's tests
def test_fsdp_fisher_and_mask_equal_one_process(fsdp_out, single_fisher):
    ranks = [load_file(fsdp_out / f"fisher_rank{r}.safetensors") for r in range(2)]
    assert set(ranks[0]) == set(single_fisher)
    for n, s in single_fisher.items():
        assert torch.equal(ranks[0][n], ranks[1][n]), f"ranks disagree on {n}"  # bit-identical full scores
        assert ranks[0][n].shape == s.shape  # full-size, not a shard
        torch.testing.assert_close(ranks[0][n], s, rtol=1e-5, atol=1e-9)
    # bf16 mixed precision: within 4 bf16 eps of each float32 tensor's max (bf16 weights and gradients, squared:
    # ~2 eps), as in test_per_sample_precision
    bf16 = load_file(fsdp_out / "fisher_bf16_rank0.safetensors")
    for n, s in single_fisher.items():
        assert float((bf16[n] - s).abs().max()) <= 4 * torch.finfo(torch.bfloat16).eps * float(s.abs().max()), n
    masks = [ft.FishMask.load(fsdp_out / f"mask_rank{r}.safetensors") for r in range(2)]
    single = ft.select_mask(single_fisher, keep=KEEP)
    for mask in masks:
        assert mask.num_selected == single.num_selected
        assert all(torch.equal(mask.indices[n], single.indices[n]) for n in single.names)
    # the 13th sample (rank 0's 7th, a second batch against rank 1's one) was scored: 12 give other scores
    rows = calibration_rows()
    fewer = ft.compute_fisher(llama_lora(), [stack(rows[i: i + 4]) for i in range(0, len(rows), 4)],
                              num_samples=FISHER_SAMPLES - 1, progress=False)
    assert any(not torch.allclose(fewer[n], s) for n, s in single_fisher.items())


def single_process_training(mask, sparse: bool):
    model = llama_lora()
    opt = ft.SparseAdamW(model, mask, **OPT) if sparse else ft.make_optimizer(model, mask, sparse=False, **OPT)
    for batch in train_batches():
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        (token_loss(model, batch) / tokens).backward()
        opt.step()
        opt.zero_grad()
    opt.close()
    return {n: p.detach() for n, p in model.named_parameters() if n in mask.shapes}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sparse", "masked"])
def test_fsdp_masked_training_matches_one_process(fsdp_out, kind):
    mask = ft.FishMask.load(fsdp_out / "mask_rank0.safetensors")
    w = [load_file(fsdp_out / f"weights_rank{r}.safetensors") for r in range(2)]
    assert int(w[0]["world"]) == 2
    for r in range(2):  # the guard's hook zeroed the masked entries of each rank's reduce-scattered shard
        assert int(w[r][f"{kind}_grads_checked"]) == STEPS * len(mask.names)
        assert int(w[r][f"{kind}_masked_grad_nonzero"]) == 0
    single = single_process_training(mask, sparse=kind == "sparse")
    worst = 0.0
    for name in mask.names:
        keep = mask.bool_mask(name)
        before, after = w[0][f"{kind}.before.{name}"], w[0][f"{kind}.after.{name}"]
        assert torch.equal(after, w[1][f"{kind}.after.{name}"]), "ranks gathered different weights"
        assert torch.equal(after[~keep], before[~keep]), f"masked entries of {name} moved under FSDP2"
        assert torch.equal(single[name][~keep], before[~keep])
        worst = max(worst, float((after - single[name]).abs().max()))
        torch.testing.assert_close(after, single[name], rtol=0, atol=WEIGHT_ATOL)
    moved = sum(int((w[0][f"{kind}.after.{n}"] != w[0][f"{kind}.before.{n}"]).sum()) for n in mask.names)
    assert moved > 0.9 * mask.num_selected
    print(f"{kind}: max |FSDP2 - 1 process| = {worst:.2e}")


@pytest.mark.slow
def test_fsdp_resume_from_sharded_checkpoint_equals_uninterrupted(fsdp_out, single_fisher, tmp_path):
    w = [load_file(fsdp_out / f"weights_rank{r}.safetensors") for r in range(2)]
    mask = ft.FishMask.load(fsdp_out / "mask_rank0.safetensors")
    for name in mask.names:  # same ops in the same order on the same shards: bit for bit
        assert torch.equal(w[0][f"resumed.{name}"], w[0][f"sparse.after.{name}"]), f"{name} differs after resume"
        assert torch.equal(w[1][f"resumed.{name}"], w[0][f"sparse.after.{name}"])
    # the checkpoint's mask file is the consolidated one: byte for byte what one process writes
    ft.select_mask(single_fisher, keep=KEEP).save(tmp_path / ft.FishMask.FILE_NAME)
    written = (fsdp_out / "ckpt" / ft.FishMask.FILE_NAME).read_bytes()
    assert written == (tmp_path / ft.FishMask.FILE_NAME).read_bytes()
    assert sorted(p.name for p in (fsdp_out / "ckpt").glob("optim_rank*.pt")) == ["optim_rank0.pt", "optim_rank1.pt"]


@pytest.mark.slow
def test_fsdp_sparse_state_is_this_ranks_share(fsdp_out):
    mask = ft.FishMask.load(fsdp_out / "mask_rank0.safetensors")
    w = [load_file(fsdp_out / f"weights_rank{r}.safetensors") for r in range(2)]
    # distributed=False, a different mask per rank, engine='loop', a Shard(1) tensor: refused clearly on each rank
    assert [int(x["refusals"]) for x in w] == [4, 4]
    kept = [int(x["kept_local"]) for x in w]
    assert sum(kept) == mask.num_selected and all(0 < k < mask.num_selected for k in kept)
    for x, k in zip(w, kept):  # two float32 moments + one int32 index per local kept entry, + step counters
        assert k * 12 <= int(x["state_bytes"]) <= k * 12 + 4 * len(mask.names) * 8


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_fsdp_dead_worker_fails_in_bounded_time(tmp_path, mode):
    # hang: the test's timeout is what ends the run (the kill of the whole tree is under test); die: a hang guard
    code, log, _ = run_torchrun(tmp_path, mode, timeout=HANG_GUARD_S if mode == "die" else 20)
    assert code != 0, f"a run whose rank 1 {mode}s must fail:\n{log[-3000:]}"
    if mode == "die":
        assert code is not None, "torchrun should notice the dead worker before the test's timeout"
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"worker processes survived the timeout: {left}"
