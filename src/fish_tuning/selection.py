"""select_mask: exactly k of the candidate entries, decided in two separate steps.

1. **Allocation** — how many entries each candidate tensor gets: ``global`` (the paper's Eq. 4-5: whatever a
   global ranking gives), ``uniform`` (every tensor the same density; for LoRA on same-shaped modules this is ERK),
   ``mass`` (proportional to the tensor's score mass ** ``alpha``), or a :class:`FishMask` (its per-tensor counts).
2. **Strategy** — which entries inside a tensor: ``fish`` (the highest scores), ``rev`` (the lowest, Eq. 15) or
   ``rand`` (seeded uniform positions).

Separating them makes the control that can falsify a score: ``strategy="rand", allocation=fish_mask`` keeps the
FISH mask's per-tensor counts with random positions (the shuffled control). If a score does no better than its
shuffled control, its ranking inside tensors carries no information: only its counts do.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor

from . import allocation as alloc
from .checks import is_int, unit_interval
from .mask import FishMask, _matches, _patterns

Strategy = Literal["fish", "rand", "rev", "fish_balanced", "fish_rank1"]
STRATEGIES = ("fish", "rand", "rev", "fish_balanced", "fish_rank1")
ALLOCATIONS = ("global", "uniform", "mass")
Allocation = Literal["global", "uniform", "mass"] | FishMask | Mapping[str, int]
DEFAULT_ALPHA = 0.5  # exponent of the mass allocation; see BENCHMARKS.md (allocation study) for how it was measured


def select_mask(
    scores: Mapping[str, Tensor],
    keep: float | None = None,
    budget: int | None = None,
    strategy: Strategy = "fish",
    seed: int = 0,
    exclude: str | Iterable[str] | None = None,
    always_train: str | Iterable[str] | None = None,
    alpha: float = DEFAULT_ALPHA,
    allocation: Allocation = "global",
) -> FishMask:
    """Keep exactly k entries of the candidates (``keep`` fraction or ``budget`` count).

    ``allocation`` sets each tensor's count and ``strategy`` the entries inside it (module docstring). With the
    default ``allocation="global"``, ``fish`` is the paper's global top-k (Eq. 4-5), ``rev`` the bottom-k (Eq. 15),
    ``rand`` a seeded uniform k over all candidates; ``fish_balanced`` is the shorthand for ``fish`` with
    ``allocation="mass"``; ``fish_rank1`` keeps whole LoRA rank-1 components by mean score (global only). With a
    :class:`FishMask` (or ``{name: count}``) as allocation, k is its total and ``keep`` / ``budget`` may be omitted.

    ``scores`` may be any per-entry score of the candidates (Fisher, or one of :mod:`fish_tuning.scores`). Ties go
    to the earlier position (candidate order, then flat index), so the same scores always give the same mask;
    scores are ranked in their own precision. Names matching ``exclude`` are not candidates and never train
    (``mask.excluded``); names matching ``always_train`` leave the budget and train fully.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    alpha = unit_interval(alpha, "alpha (the mass allocation's exponent)")
    if strategy == "rand" and not is_int(seed):
        raise ValueError(f"strategy='rand' needs an integer seed (the same seed gives the same mask), got {seed!r}")
    counts_of = _allocation_counts(allocation)
    if strategy == "fish_balanced":
        if counts_of is not None or allocation not in ("global", "mass"):
            raise ValueError("strategy='fish_balanced' is fish with allocation='mass'; give one of them, not "
                             f"allocation={_label(allocation)!r} too")
        allocation = "mass"
    if strategy == "fish_rank1" and allocation != "global":
        raise ValueError("strategy='fish_rank1' keeps whole rank-1 components over all tensors; it needs "
                         f"allocation='global', got {_label(allocation)!r}")
    scores = {n: s if isinstance(s, Tensor) else torch.as_tensor(s) for n, s in scores.items()}  # numpy works too
    excl, always = _patterns(exclude, "exclude"), _patterns(always_train, "always_train")
    always_names = [n for n in scores if _matches(n, always)]
    excluded = [n for n in scores if _matches(n, excl) and n not in always_names]
    cand = {n: s for n, s in scores.items() if n not in excluded and n not in always_names}
    if not cand:
        raise ValueError("no candidate parameters left to select from (scores empty, or all excluded / always_train)")
    n_total = sum(s.numel() for s in cand.values())
    if n_total == 0:
        raise ValueError(f"every candidate tensor is empty (0 entries: {list(cand)[:3]}); nothing can be selected")
    counts = _given_counts(counts_of, cand) if counts_of is not None else None
    if counts is not None:
        if keep is None and budget is None:
            budget = sum(counts)
        k = resolve_k(n_total, keep, budget)
        if k != sum(counts):
            raise ValueError(f"allocation gives {sum(counts):,} entries in all but keep/budget asks for {k:,}; "
                             "omit keep/budget to take the allocation's total")
    else:
        k = resolve_k(n_total, keep, budget)

    flat = _flat_scores(cand)
    sizes = [t.numel() for t in cand.values()]
    if strategy == "fish_rank1":
        keep_flat = alloc.rank1({n: f.view(t.shape) for (n, t), f in zip(cand.items(), torch.split(flat, sizes))}, k)
    elif counts is None and allocation == "global":
        if strategy == "rand":
            chosen = torch.randperm(n_total, generator=torch.Generator().manual_seed(int(seed)))[:k]
        else:  # stable sort: equal scores keep their positional order, so ties resolve deterministically
            chosen = torch.sort(flat, descending=(strategy == "fish"), stable=True).indices[:k]
        keep_flat = torch.zeros(n_total, dtype=torch.bool)
        keep_flat[chosen] = True
    else:
        if counts is None:
            weights = sizes if allocation == "uniform" else [float(t.double().sum()) for t in torch.split(flat, sizes)]
            counts = alloc.tensor_budgets(weights, sizes, k, 1.0 if allocation == "uniform" else float(alpha))
        inner = "fish" if strategy == "fish_balanced" else strategy
        keep_flat = alloc.within(list(torch.split(flat, sizes)), counts, inner, int(seed) if is_int(seed) else 0)

    shapes, indices, offset = {}, {}, 0
    for name, t in cand.items():
        shapes[name] = tuple(t.shape)
        indices[name] = keep_flat[offset: offset + t.numel()].nonzero().view(-1)
        offset += t.numel()
    always_numel = sum(scores[n].numel() for n in always_names)
    meta = {"k": k, "keep": k / n_total, "always_train_numel": always_numel, "allocation": _label(allocation)}
    if allocation == "mass":
        meta["alpha"] = float(alpha)
    return FishMask(shapes=shapes, indices=indices, always_train=always_names, always_train_patterns=always,
                    excluded=excluded, strategy=strategy, seed=int(seed) if strategy == "rand" else None, meta=meta)


def _allocation_counts(allocation: object) -> Mapping[str, int] | None:
    """Per-tensor counts of a mask / mapping allocation (None for a named rule); a bad name is a ValueError."""
    if isinstance(allocation, FishMask):
        return {n: int(i.numel()) for n, i in allocation.indices.items()}
    if isinstance(allocation, Mapping):
        return allocation
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, a FishMask or {{name: count}}, got {allocation!r}")
    return None


def _given_counts(counts: Mapping[str, int], cand: Mapping[str, Tensor]) -> list[int]:
    """The allocation's count of each candidate, in candidate order; it must name exactly these candidates."""
    missing, extra = [n for n in cand if n not in counts], [n for n in counts if n not in cand]
    if missing or extra:
        which = f"it lacks '{missing[0]}'" if missing else f"'{extra[0]}' is not a candidate here"
        raise ValueError(f"the allocation's tensors differ from the candidates ({which}); give a mask made for the "
                         "same model, PEFT config, exclude and always_train")
    out = []
    for name, t in cand.items():
        c = counts[name]
        if not is_int(c) or not 0 <= int(c) <= t.numel():
            raise ValueError(f"allocation count of '{name}' must be an integer in [0, {t.numel()}], got {c!r}")
        out.append(int(c))
    return out


def _flat_scores(cand: Mapping[str, Tensor]) -> Tensor:
    dtype = torch.float32
    for t in cand.values():
        dtype = torch.promote_types(dtype, t.dtype if t.is_floating_point() else torch.float64)
    flat = torch.cat([t.detach().reshape(-1).to(device="cpu", dtype=dtype) for t in cand.values()])
    if not bool(torch.isfinite(flat).all()):
        bad = next(n for n, t in cand.items() if not bool(torch.isfinite(t).all()))
        raise ValueError(f"scores of '{bad}' contain NaN/inf; recompute them")
    return flat


def _label(allocation: object) -> str:
    if isinstance(allocation, FishMask):
        return f"mask:{allocation.fingerprint()}"
    return "counts" if isinstance(allocation, Mapping) else str(allocation)


def check_keep_budget(keep: object, budget: object) -> tuple[float | None, int | None]:
    """Validate ``keep`` / ``budget`` before any work: exactly one, keep a fraction in (0, 1], budget >= 1.

    Accepts numpy scalars and 0-d tensors; returns them as a Python float / int.
    """
    if (keep is None) == (budget is None):
        raise ValueError("give exactly one of keep= (fraction in (0, 1]) or budget= (number of entries)")
    if budget is not None:
        value = budget.item() if isinstance(budget, Tensor) and budget.dim() == 0 else budget
        if not is_int(value) or int(value) < 1:
            raise ValueError(f"budget must be a positive integer (a number of entries), got {budget!r}")
        return None, int(value)
    value = keep.item() if isinstance(keep, Tensor) and keep.dim() == 0 else keep
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}; use budget= for an entry count")
    return float(value), None


def resolve_k(n_total: int, keep: float | None, budget: int | None) -> int:
    """The exact number of entries to keep among ``n_total`` candidates."""
    keep, budget = check_keep_budget(keep, budget)
    if budget is not None:
        if budget > n_total:
            raise ValueError(f"budget must be an integer in [1, {n_total:,}] (the number of candidates), got {budget}")
        return budget
    return max(1, min(n_total, round(keep * n_total)))
