"""FishCallback under DeepSpeed ZeRO-3 with CPU optimizer offload (the paper's set-up), and ZeRO-2: 2 gloo ranks vs
one process.

tests/sharded_trainer_worker.py does the rank side (``zero3``); tests/sharded_trainer.py holds the shared
Trainer, data, the 1-process reference and the checks. Skipped when deepspeed is not installed
(``pip install 'fish-tuning[deepspeed]'``; ``make test`` installs it).
"""

import psutil
import pytest
import torch
from safetensors.torch import load_file

import fish_tuning as ft
from helpers import HANG_GUARD_S
from sharded_trainer import (
    check_against_single,
    check_resume,
    launch,
    run_torchrun,
    single_reference,
    trained_out,
)

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def zero3_out(tmp_path_factory):
    return trained_out(tmp_path_factory, "zero3", timeout=HANG_GUARD_S)


@pytest.fixture(scope="module")
def zero2_out(tmp_path_factory):
    return trained_out(tmp_path_factory, "zero2", timeout=HANG_GUARD_S)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return single_reference(tmp_path_factory.mktemp("single"))


@pytest.mark.slow  # one torchrun launch (two ZeRO-3 runs, ~40 s) shared by this file's tests
def test_zero3_mask_and_weights_equal_one_process(zero3_out, single):
    """Fisher from the partitioned model = 1 process (rtol 1e-5), mask bit-for-bit, masked entries bit-identical,
    masked gradients zero before the step, weights within WEIGHT_ATOL."""
    worst = check_against_single(zero3_out, single)
    for r in range(2):  # a guard attached to some other optimizer than ZeRO's: a clear error on every rank
        assert int(load_file(zero3_out / f"full_rank{r}.safetensors")["refused"]) == 1
    print(f"max |ZeRO-3 - 1 process| = {worst:.2e}")


@pytest.mark.slow
def test_zero3_resume_from_checkpoint_equals_uninterrupted(zero3_out, single):
    check_resume(zero3_out, single)


@pytest.mark.slow
def test_zero2_mask_weights_and_resume_equal_one_process(zero2_out, single):
    """ZeRO-2 (parameters whole on every rank, fp32 masters and gradients partitioned): the same checks."""
    worst = check_against_single(zero2_out, single)
    check_resume(zero2_out, single)
    print(f"max |ZeRO-2 - 1 process| = {worst:.2e}")


@pytest.mark.slow
def test_zero3_dead_worker_fails_in_bounded_time(tmp_path):
    code, log, _ = run_torchrun("zero3", tmp_path, "die", timeout=HANG_GUARD_S)
    assert code is not None and code != 0, f"a run whose rank 1 dies must fail, not hang:\n{log[-3000:]}"
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"worker processes survived: {left}"


@pytest.mark.slow
def test_zero3_engine_loop_bf16_masked_entries_bit_identical(tmp_path):
    """DeepSpeed's own loop (no Trainer): bf16 ZeRO-3, CPU offload, accumulation 2, clipping; the guard attached to
    engine.optimizer keeps every masked bf16 entry bit-identical while the kept ones train; compute_fisher runs on the
    bf16 partitions and matches the fp32 Fisher."""
    code, log, _ = launch("zero3_engine_worker.py", str(tmp_path), timeout=HANG_GUARD_S)
    assert code == 0, f"torchrun failed:\n{log[-8000:]}"
    mask = ft.FishMask.load(tmp_path / "engine_mask_rank0.safetensors")
    w = [load_file(tmp_path / f"engine_rank{r}.safetensors") for r in range(2)]
    moved = 0
    for name in mask.names:
        keep = mask.bool_mask(name)
        before, after = w[0][f"before.{name}"], w[0][f"after.{name}"]
        assert after.dtype == torch.bfloat16 and torch.equal(after, w[1][f"after.{name}"])
        assert torch.equal(after[~keep], before[~keep]), f"masked bf16 entries of {name} moved"
        moved += int((after[keep] != before[keep]).sum())
    assert moved > 0.9 * mask.num_selected
    # bf16 ZeRO-3 Fisher (the hooks' checks at bf16 precision; no loop to fall back to) vs the fp32 one: within
    # 4 bf16 eps of each tensor's max (bf16 weights and gradients, squared: ~2 eps), as in test_per_sample_precision.
    scores = load_file(tmp_path / "engine_fisher_rank0.safetensors")
    for name in mask.names:
        want, got = scores[f"fp32.{name}"], scores[f"bf16.{name}"]
        assert float((got - want).abs().max()) <= 4 * torch.finfo(torch.bfloat16).eps * float(want.abs().max()), name


@pytest.mark.parametrize("flag, value, words", [
    ("swap_optimizer", True, "NVMe"),
    ("zenflow", True, "ZenFlow"),
    ("superoffload_cpu_optimizer", object(), "SuperOffload"),  # steps CPU sub-groups in a worker process
])
def test_zero_variants_that_step_outside_the_wrapped_optimizer_are_refused(flag, value, words):
    from types import SimpleNamespace

    from fish_tuning.zero3 import MasterPartitions

    fake = SimpleNamespace(fp32_partitioned_groups_flat=[], grad_position={}, get_param_id=id, optimizer=None,
                           **{flag: value})
    with pytest.raises(NotImplementedError, match=words):
        MasterPartitions(fake, [])
