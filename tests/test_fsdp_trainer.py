"""FishCallback in a Trainer with accelerate's FSDP2 (``fully_shard``: DTensor parameters): 2 gloo ranks vs one
process. accelerate 1.15 turns FSDP on only off the CPU, so the worker sets accelerate's state up as a GPU launch
would (see ``emulate_gpu_launch`` in tests/sharded_trainer_worker.py); from there on the Trainer runs unchanged.
"""

import psutil
import pytest

from helpers import HANG_GUARD_S
from sharded_trainer import check_against_single, check_resume, run_torchrun, single_reference, trained_out


@pytest.fixture(scope="module")
def fsdp2_out(tmp_path_factory):
    return trained_out(tmp_path_factory, "fsdp2", timeout=HANG_GUARD_S)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return single_reference(tmp_path_factory.mktemp("single"))


@pytest.mark.slow  # one torchrun launch (two FSDP2 runs) shared by this file's tests
def test_fsdp2_trainer_mask_and_weights_equal_one_process(fsdp2_out, single):
    """Fisher from the partitioned model = 1 process (rtol 1e-5), mask bit-for-bit, masked entries bit-identical,
    masked gradients zero before the step, weights within WEIGHT_ATOL."""
    worst = check_against_single(fsdp2_out, single)
    print(f"max |FSDP2 - 1 process| = {worst:.2e}")


@pytest.mark.slow
def test_fsdp2_trainer_resume_from_checkpoint_equals_uninterrupted(fsdp2_out, single):
    check_resume(fsdp2_out, single)


@pytest.mark.slow
def test_fsdp2_trainer_dead_worker_fails_in_bounded_time(tmp_path):
    code, log, _ = run_torchrun("fsdp2", tmp_path, "die", timeout=HANG_GUARD_S)
    assert code is not None and code != 0, f"a run whose rank 1 dies must fail, not hang:\n{log[-3000:]}"
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"worker processes survived: {left}"
