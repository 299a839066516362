"""Per-entry scores beyond the raw Fisher, all from one :func:`fish_tuning.fisher.gradient_moments` pass.

The diagonal Fisher E[g²] has two known faults as a saliency score for masked fine-tuning (BENCHMARKS.md,
"Selection that beats chance"):

- for a Linear weight it is close to an outer product E[x_j²]·E[δ_i²], so its top entries fill whole rows and
  columns on a few outlier hidden dimensions. ``normalized`` divides each entry by the product of its row and
  column means (times the tensor mean, so scale across tensors is kept): an exact outer product becomes flat,
  and what remains is the entry's excess over its row and column.
- E[g²] = (E g)² + Var g rewards noisy entries, while Adam moves every kept entry by about lr per step whatever
  its gradient's size, so what makes a kept entry useful is a gradient that keeps its sign. ``consistency`` is the
  lower confidence bound |mean g| − z·SE (SpIEL's regrowth score, z = 1.65); ``snr`` is (E g)² / E[g²] in [0, 1].

Every score is a dict of tensors shaped as the candidates, for :func:`fish_tuning.select_mask`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .fisher import GradientMoments

SCORES = ("fisher", "normalized", "consistency", "snr")
_TINY = 1e-30


def normalized(fisher: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """F_ij · mean(F) / (rowmean_i · colmean_j) for 2-D tensors (0 where a row or column is all zero); other
    tensors unchanged. Float64, so the division adds no ties."""
    out = {}
    for name, f in fisher.items():
        f = f.detach().double()
        if f.dim() != 2:
            out[name] = f
            continue
        row, col = f.mean(1, keepdim=True), f.mean(0, keepdim=True)
        denom = row * col
        out[name] = torch.where(denom > _TINY, f * f.mean() / denom.clamp_min(_TINY), torch.zeros_like(f))
    return out


def consistency(moments: GradientMoments, z: float = 1.65) -> dict[str, Tensor]:
    """|mean g| − z·SE per entry, SE = sqrt(unbiased variance / N): large only where the per-sample gradients agree
    in sign. Needs N ≥ 2."""
    n = moments.num_samples
    if n < 2:
        raise ValueError(f"the consistency score needs at least 2 samples (a variance), got {n}")
    out = {}
    for name, f in moments.fisher.items():
        m = moments.mean[name].detach().double()
        var = (f.detach().double() - m.square()).clamp_min(0) * n / (n - 1)
        out[name] = m.abs() - z * (var / n).sqrt()
    return out


def snr(moments: GradientMoments) -> dict[str, Tensor]:
    """(E g)² / E[g²] per entry, in [0, 1] (0 where the Fisher is 0): the share of the Fisher that is signal."""
    out = {}
    for name, f in moments.fisher.items():
        f = f.detach().double()
        m2 = moments.mean[name].detach().double().square()
        out[name] = torch.where(f > 0, (m2 / f.clamp_min(_TINY)).clamp(max=1.0), torch.zeros_like(f))
    return out


def score(moments: GradientMoments, name: str = "fisher") -> dict[str, Tensor]:
    """The score called ``name`` (one of :data:`SCORES`) from one pass's moments."""
    if name == "fisher":
        return dict(moments.fisher)
    if name == "normalized":
        return normalized(moments.fisher)
    if name == "consistency":
        return consistency(moments)
    if name == "snr":
        return snr(moments)
    raise ValueError(f"score must be one of {SCORES}, got {name!r}")
