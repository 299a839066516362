"""Test helpers shared by several test files (one copy of each idea)."""

from __future__ import annotations

import signal

import torch

# The one time limit for every subprocess a test waits on (torchrun launches, a fresh venv, the CLI): a generous
# hang guard that only a real hang reaches, never a speed assumption (a loaded 2-core machine once took 5+ minutes
# for a launch that takes one idle).
HANG_GUARD_S = 1800


class ListDataset(torch.utils.data.Dataset):
    """A map-style dataset over a list of example dicts (what the Trainer and calibration_loader take)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_only_kept_moved(model, mask, before: dict[str, torch.Tensor]) -> int:
    """Every masked candidate entry is bit-identical to ``before``; returns how many kept entries moved."""
    after = dict(model.named_parameters())
    moved = 0
    for name in mask.names:
        keep = mask.bool_mask(name)
        new = after[name].detach()
        assert torch.equal(new[~keep], before[name][~keep]), f"masked entries of {name} changed"
        moved += int((new[keep] != before[name][keep]).sum())
    return moved


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every descendant. torchrun starts each worker in its own session, so killing the
    launcher's process group alone leaves a hung worker alive, holding the log pipe open (communicate() hangs)."""
    import psutil  # dev extra only (the adapters environment does not have it)

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
