"""Where the budget goes: per-tensor counts and the rules that fill them (used by :mod:`fish_tuning.selection`).

Global top-k (``fish``) may spend most of k on a few tensors (the last layer) and, inside a tensor, on a few
hidden dimensions. The alternatives here are all exactly k and deterministic (ties go to the earliest position):

- per-tensor counts (``tensor_budgets``): proportional to a weight ** alpha (the tensor's size: uniform density;
  its score mass: ``allocation="mass"``, alias ``fish_balanced``), capped at its size; ``within`` then fills each
  tensor's count by score or at random.
- ``fish_rank1``: LoRA's rank-1 components (row i of A with column i of B, PiSSA's i-th singular direction) are
  kept whole, best mean Fisher first; any other candidate entry is a unit of its own. The last unit that does not
  fit is filled with its best entries, so exactly k entries are kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def tensor_budgets(mass: list[float], sizes: list[int], k: int, alpha: float) -> list[int]:
    """Integer budgets summing to ``k``, proportional to ``mass ** alpha`` and capped at ``sizes`` (water-filling,
    then largest remainders, ties to the earlier tensor)."""
    weights = [(m**alpha if m > 0 else (1.0 if alpha == 0 else 0.0)) for m in mass]
    quota = [0.0] * len(sizes)
    free, remaining = set(range(len(sizes))), k
    while free:
        total = sum(weights[i] for i in free)
        share = {i: (remaining * weights[i] / total if total > 0 else remaining / len(free)) for i in free}
        capped = [i for i in sorted(free) if share[i] >= sizes[i]]
        if not capped:
            for i in free:
                quota[i] = share[i]
            break
        for i in capped:
            quota[i] = float(sizes[i])
            remaining -= sizes[i]
            free.remove(i)
    budgets = [min(sizes[i], math.floor(q)) for i, q in enumerate(quota)]
    left = k - sum(budgets)
    order = sorted(range(len(sizes)), key=lambda i: (-(quota[i] - math.floor(quota[i])), i))
    for i in order:
        if left == 0:
            break
        if budgets[i] < sizes[i]:
            budgets[i] += 1
            left -= 1
    for i in range(len(sizes)):  # only reachable through float rounding: give what is left to any room
        while left > 0 and budgets[i] < sizes[i]:
            budgets[i] += 1
            left -= 1
    return budgets


def within(flats: list[Tensor], counts: list[int], strategy: str, seed: int) -> Tensor:
    """Keep-flags over the concatenated candidates: ``counts[t]`` entries of tensor t, by ``strategy`` inside it
    (``fish``: highest scores, ``rev``: lowest, ties to the earlier position; ``rand``: seeded positions, one
    generator walked through the tensors in order, so the same seed and counts give the same mask)."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for t, b in zip(flats, counts):
        flags = torch.zeros(t.numel(), dtype=torch.bool)
        if strategy == "rand":
            chosen = torch.randperm(t.numel(), generator=gen)[:b]
        else:
            chosen = torch.sort(t, descending=(strategy == "fish"), stable=True).indices[:b]
        flags[chosen] = True
        keep.append(flags)
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.bool)


def _partner(name: str, names: set[str]) -> str | None:
    for a, b in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
        parts = name.split(".")
        if a in parts:
            other = ".".join(b if p == a else p for p in parts)
            return other if other in names else None
    return None


def rank1(scores: dict[str, Tensor], k: int) -> Tensor:
    """Keep-flags over the concatenated candidates for ``fish_rank1``."""
    names = list(scores)
    offsets, offset = {}, 0
    for n in names:
        offsets[n] = offset
        offset += scores[n].numel()
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    units: list[Tensor] = []  # flat positions of each rank-1 component
    paired: set[str] = set()
    for n in names:
        b = _partner(n, set(names))
        if b is None or scores[n].dim() < 2 or scores[b].dim() < 2 or scores[n].shape[0] != scores[b].shape[1]:
            continue
        pos_a = offsets[n] + torch.arange(scores[n].numel()).view(scores[n].shape[0], -1)
        pos_b = offsets[b] + torch.arange(scores[b].numel()).view(scores[b].shape[0], scores[b].shape[1], -1)
        units += [torch.cat([pos_a[i], pos_b[:, i].reshape(-1)]) for i in range(scores[n].shape[0])]
        paired.update((n, b))
    singles = torch.cat([offsets[n] + torch.arange(scores[n].numel()) for n in names if n not in paired]
                        or [torch.zeros(0, dtype=torch.long)])
    # One row per unit: mean score, first position, size; order by mean (desc), then position.
    mean = torch.cat([torch.stack([flat[u].double().mean() for u in units]) if units else torch.zeros(0,
                      dtype=torch.float64), flat[singles].double()])
    first = torch.cat([torch.tensor([int(u.min()) for u in units], dtype=torch.long), singles])
    size = torch.cat([torch.tensor([u.numel() for u in units], dtype=torch.long),
                      torch.ones(singles.numel(), dtype=torch.long)])
    order = torch.sort(first, stable=True).indices
    order = order[torch.sort(mean[order], descending=True, stable=True).indices]
    whole = int((torch.cumsum(size[order], 0) <= k).sum())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    n_units = len(units)
    for i in order[:whole].tolist():
        if i < n_units:
            keep[units[i]] = True
    keep[singles[order[:whole][order[:whole] >= n_units] - n_units]] = True
    left = k - int(keep.sum())
    if left > 0:  # the unit that does not fit: its best entries, ties to the earliest position
        i = int(order[whole])
        u = torch.sort(units[i]).values if i < n_units else singles[i - n_units].view(1)
        keep[u[torch.sort(flat[u], descending=True, stable=True).indices[:left]]] = True
    return keep
