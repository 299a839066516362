"""Scoring after a short dense warm-up, then rewinding (late rewinding, as LT-SFT selects its sparse mask).

Gradients at the initial weights say little about where training will go (one-shot masks at init are no better
than their shuffled control: BENCHMARKS.md). ``FishCallback(warmup_steps=W)`` lets the adapter train densely for W
optimizer steps, scores the entries there, then puts every trainable tensor back to its value at step 0 and clears
the optimizer's state, so the masked run starts from the same init as any other; only the mask carries the warm-up.
"""

from __future__ import annotations

import torch
from torch import nn


class WarmUp:
    """A snapshot of the trainable tensors at train begin, and the rewind to it."""

    def __init__(self, model: nn.Module, steps: int):
        self.steps = steps
        self.init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def due(self, step: int) -> bool:
        return step >= self.steps

    @torch.no_grad()
    def rewind(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Every snapshotted tensor back to its init, and no state left in ``optimizer`` (moments, step counts)."""
        for n, p in model.named_parameters():
            if n in self.init:
                p.copy_(self.init[n].to(device=p.device, dtype=p.dtype))
        if optimizer is not None:
            optimizer.state.clear()
